"""Sweep the GDN kernels' launch settings on one GPU: each setting in its own process (a miscompiled variant that
faults cannot take the others down), through ``bench_gdn.py --impls ours --profile --kernel-settings``.

    python benchmarks/sweep_gdn.py --out /tmp/out [--shapes d128] [--only name,name] [--timeout 90]
    OLMO_HYBRID_GDN_DOT=tf32 python benchmarks/sweep_gdn.py --out /tmp/out   # every setting on tf32 operands

A setting is a set of ``olmo_hybrid.ops.KernelSettings`` fields, applied over a base built from the environment
variables below (this script is the only reader of them; the ops take their settings as arguments). Per setting the
log shows the float64-reference errors, fwd / fwd+bwd times and the per-kernel profile; the summary table at the
end lists them side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

SETTINGS = {  # name: KernelSettings fields (defaults since 2026-11-22: bf16 operands, backward V tiles 64, 4 warps)
    "default": {},
    "tf32": {"dot": "tf32"},
    "bwd_bv32_w4": {"backward_block_v": 32, "backward_warps": 4},
    "bwd_bv64_w4": {"backward_block_v": 64, "backward_warps": 4},
    "bwd_bv32_w8": {"backward_block_v": 32, "backward_warps": 8},
    "seq_w8": {"warps": 8},
    "seq_bv128": {"block_v": 128, "warps": 8},
}

# Environment overrides of the base settings: variable -> KernelSettings field (the dot variables: see below).
ENV_INT_FIELDS = {
    "OLMO_HYBRID_GDN_BV": "block_v",
    "OLMO_HYBRID_GDN_WARPS": "warps",
    "OLMO_HYBRID_GDN_STAGES": "stages",
    "OLMO_HYBRID_GDN_BWD_BV": "backward_block_v",
    "OLMO_HYBRID_GDN_BWD_WARPS": "backward_warps",
    "OLMO_HYBRID_GDN_BWD_STAGES": "backward_stages",
}


def settings_from_env(environ) -> dict:
    """KernelSettings fields from ``OLMO_HYBRID_GDN_*`` variables: ``_DOT`` sets the dot precision of both passes,
    ``_DOT_FWD`` / ``_DOT_BWD`` that of one pass (winning over ``_DOT``); the others as in ``ENV_INT_FIELDS``."""
    from olmo_hybrid.ops import KernelSettings

    dot = environ.get("OLMO_HYBRID_GDN_DOT", KernelSettings().dot)
    fields = dict(dot=environ.get("OLMO_HYBRID_GDN_DOT_FWD", dot),
                  backward_dot=environ.get("OLMO_HYBRID_GDN_DOT_BWD", dot))
    fields.update({field: int(environ[var]) for var, field in ENV_INT_FIELDS.items() if var in environ})
    KernelSettings(**fields)  # a bad value fails here, naming the field, before any GPU work
    return fields


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="d128")
    p.add_argument("--only", help="comma list of setting names")
    p.add_argument("--timeout", type=float, default=90.0)
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(SETTINGS)
    here = os.path.dirname(os.path.abspath(__file__))
    base = settings_from_env(os.environ)
    summary = []
    for name in names:
        fields = {**base, **SETTINGS[name]}
        js = os.path.join(tempfile.gettempdir(), f"sweep_{name}.json")  # only the summary goes to --out
        cmd = [sys.executable, os.path.join(here, "bench_gdn.py"), "--impls", "ours", "--profile",
               "--shapes", args.shapes, "--json", js, "--kernel-settings", json.dumps(fields)]
        print(f"=== {name} {fields}", flush=True)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            out = r.stdout + r.stderr
            status = f"exit {r.returncode}"
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            status = "timeout"
        print("\n".join(line for line in out.splitlines() if "Warn" not in line)[-3000:], flush=True)
        row = dict(name=name, settings=fields, status=status)
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
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    sys.exit(main())
