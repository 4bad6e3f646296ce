"""Sweep the GDN kernels' launch settings on one GPU: each setting in its own process (a miscompiled variant that
faults cannot take the others down), through ``bench_gdn.py --impls ours --profile``.

    python benchmarks/sweep_gdn.py --out /tmp/out [--shapes d128] [--only name,name] [--timeout 90]

A setting is a set of environment variables read by ``ops/triton/gdn_chunk.py::_config`` and ``_dot_precision``.
Per setting the log shows the float64-reference errors, fwd / fwd+bwd times and the per-kernel profile; the
summary table at the end lists them side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

SETTINGS = {  # name: environment (defaults since 2026-11-22: bf16 operands, backward V tiles 64 at 8 warps)
    "default": {},
    "tf32": {"OLMO_HYBRID_GDN_DOT": "tf32"},
    "bwd_bv32_w4": {"OLMO_HYBRID_GDN_BWD_BV": "32", "OLMO_HYBRID_GDN_BWD_WARPS": "4"},
    "bwd_bv64_w4": {"OLMO_HYBRID_GDN_BWD_BV": "64", "OLMO_HYBRID_GDN_BWD_WARPS": "4"},
    "bwd_bv32_w8": {"OLMO_HYBRID_GDN_BWD_BV": "32"},
    "seq_w8": {"OLMO_HYBRID_GDN_WARPS": "8"},
    "seq_bv128": {"OLMO_HYBRID_GDN_BV": "128", "OLMO_HYBRID_GDN_WARPS": "8"},
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="d128")
    p.add_argument("--only", help="comma list of setting names")
    p.add_argument("--timeout", type=float, default=90.0)
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(SETTINGS)
    here = os.path.dirname(os.path.abspath(__file__))
    summary = []
    for name in names:
        env = dict(os.environ, **SETTINGS[name])
        js = os.path.join(tempfile.gettempdir(), f"sweep_{name}.json")  # only the summary goes to --out
        cmd = [sys.executable, os.path.join(here, "bench_gdn.py"), "--impls", "ours", "--profile",
               "--shapes", args.shapes, "--json", js]
        print(f"=== {name} {SETTINGS[name]}", flush=True)
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            out = r.stdout + r.stderr
            status = f"exit {r.returncode}"
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            status = "timeout"
        print("\n".join(line for line in out.splitlines() if "Warn" not in line)[-3000:], flush=True)
        row = dict(name=name, status=status)
        if os.path.exists(js):
            res = json.load(open(js))
            row["gdn"] = res.get("gdn", [])
            row["errors"] = res.get("reference_errors", {})
            row["breakdown"] = {k: v[:8] for k, v in res.get("breakdown", {}).items()}
        summary.append(row)
        with open(os.path.join(args.out, "sweep_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print("\nsetting               status   shape    fwd(infer)   fwd   fwd+bwd   max ref err")
    for row in summary:
        for g in row.get("gdn", []):
            errs = row["errors"].get(f"{g['shape']}/ours", {})
            print(f"{row['name']:20s} {row['status']:8s} {g['shape']:7s} {g.get('fwd(infer)', 0):8.3f} "
                  f"{g.get('fwd', 0):8.3f} {g.get('fwd+bwd', 0):8.3f}   {max(errs.values(), default=0):.2e}")
        for shape, rows in row.get("breakdown", {}).items():
            print("      " + ", ".join(f"{key[:18]} {ms:.3f}" for key, ms, _ in rows))
        if not row.get("gdn"):
            print(f"{row['name']:20s} {row['status']:8s} (no result)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
