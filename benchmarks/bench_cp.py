"""Context parallelism on GPUs: the 1b hybrid at 32K and 64K tokens on 2 GPUs, Ulysses against state
passing, with one GPU without CP as the reference where it fits.

    python benchmarks/bench_cp.py --md $OUT/cp.md --json $OUT/cp.json     # starts torchrun itself
    python benchmarks/bench_cp.py --lengths 65536                            # one length (bash run_device_cp.sh 65536)
    # plumbing check on a CPU (numbers meaningless): the tiny preset at 512 tokens, eager, on its own BPE
    python benchmarks/bench_cp.py --preset tiny --lengths 512 --steps 4 --warmup 1 --no-compile \
        --set data.bpe_vocab=4096 --set trainer.device=cpu

Each configuration is the real trainer (``python -m olmo_hybrid.train`` under torchrun) for ``--steps`` steps on
the bundled corpus with the dolma2 tokenizer (``data.bpe_vocab=0``), compiled blocks, chunked loss, selective
activation checkpointing, documents packed without intra-document masking (OLMo Hybrid's long-context setting;
a [T, T] document mask at 64K would not fit). Reported per configuration: tokens/s per GPU and MFU (medians after
``--warmup`` steps, from ``metrics.jsonl``), peak memory, and the losses; per sequence length, the largest relative
difference of every CP run's per-step losses from the first configuration's at that length (all runs see the same
batches: the global batch is one sequence). Beside them, the per-layer bytes each rank sends in forward by the
formulas of docs/training.md ("Context parallelism"); backward sends as much again.

A configuration that runs out of memory or fails is reported as such and the others still run; a failure with
``trainer.compile=true`` is retried eagerly once (the eager number is then marked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [(1, None), (2, "ulysses"), (2, "state_passing")]  # (GPUs, cp_mode or None for no CP), at every length


def overrides(seq: int, gpus: int, mode: str | None, steps: int, compile: bool) -> list[str]:
    out = [f"data.seq_len={seq}", "data.batch_size=1", "data.bpe_vocab=0", f"model.max_seq_len={max(seq, 8192)}",
           f"trainer.steps={steps}", f"trainer.compile={compile}", "trainer.loss_chunk_tokens=8192",
           "trainer.activation_checkpointing=selective", "trainer.eval_interval=0", "trainer.sample_tokens=0",
           "trainer.export_hf=false", "trainer.max_minutes=0", "trainer.log_interval=1", "trainer.save_interval=0",
           "schedule.warmup_steps=5", "optim.lr=3e-4", "trainer.eval_batches=1"]
    if mode is not None:
        out += [f"parallel.cp_degree={gpus}", f"parallel.cp_mode={mode}"]
    return out


def comm_bytes_per_layer(preset: str, seq: int, n: int) -> dict:
    """Bytes one rank sends per layer in forward (bf16 activations, fp32 gates and states; batch 1)."""
    from olmo_hybrid.config import model_preset

    m = model_preset(preset).resolved()
    tl, hk, hvv, hv = seq // n, m.gdn_heads * m.gdn_head_k, m.gdn_v_heads * m.gdn_head_v, m.gdn_v_heads
    return {
        "attention_ulysses": (n - 1) / n * tl * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) * 2,
        "gdn_ulysses": (n - 1) / n * tl * ((2 * hk + 2 * hvv + hv) * 2 + hv * 4),
        "gdn_state_passing": (n - 1) * hv * m.gdn_head_k * (m.gdn_head_k + m.gdn_head_v) * 4,
        "conv_halo": (n - 1) * (m.gdn_conv_size - 1) * (2 * hk + hvv) * 2,
    }


def run(args, seq: int, gpus: int, mode: str | None, compile: bool, work: Path) -> tuple[dict | None, str]:
    from olmo_hybrid.config import to_dict
    from olmo_hybrid.train.config import build_config

    name = f"{args.preset} seq {seq}, " + (f"{gpus} GPUs CP {mode}" if mode else f"{gpus} GPU, no CP")
    print(f"== {name} (compile {compile})", flush=True)
    cfg = build_config(model=args.preset, overrides=overrides(seq, gpus, mode, args.steps, compile) + args.set)
    cfg_file, out = work / f"{seq}_{gpus}_{mode}.json", work / f"run_{seq}_{gpus}_{mode}"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           "-m", "olmo_hybrid.train", str(cfg_file), "--out", str(out)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return None, "timeout"
    if proc.returncode != 0:
        oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        print(f"   failed ({'out of memory' if oom else 'error'}): {proc.stderr[-2500:]}", flush=True)
        return None, "oom" if oom else "error"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steady = [r for r in rows if r["step"] > args.warmup]
    r = {"name": name, "seq_len": seq, "gpus": gpus, "cp_mode": mode or "-", "compile": compile,
         "tokens_per_s_per_gpu": statistics.median(x["tokens_per_s_per_device"] for x in steady),
         "mfu": statistics.median(x["mfu"] for x in steady) if steady and "mfu" in steady[0] else None,
         "peak_mem_gib": max(x.get("peak_mem_gib", 0.0) for x in rows), "losses": [x["loss"] for x in rows],
         "wall_s": time.perf_counter() - t0}
    print(json.dumps(r), flush=True)
    return r, ""


def markdown(results: list[dict], comm: dict, versions: str) -> str:
    lines = [versions, "", "| run | compile | tokens/s/GPU | MFU | peak mem (GiB) | loss first -> last | max rel. loss "
             "diff vs the first run of its length |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['name']} | - | {r['failed']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        diff = f"{r['loss_rel_diff']:.1e}" if r.get("loss_rel_diff") is not None else "-"
        lines.append(f"| {r['name']} | {r['compile']} | {r['tokens_per_s_per_gpu']:,.0f} | {mfu} | "
                     f"{r['peak_mem_gib']:.1f} | {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} | {diff} |")
    lines += ["", "Bytes each rank sends per layer in forward (formula; backward the same):", "",
              "| seq | attention (Ulysses) | GDN Ulysses | GDN state passing | conv halos |", "|---|---|---|---|---|"]
    for seq, c in comm.items():
        lines.append(f"| {seq} | {c['attention_ulysses'] / 1e6:.1f} MB | {c['gdn_ulysses'] / 1e6:.1f} MB | "
                     f"{c['gdn_state_passing'] / 1e6:.2f} MB | {c['conv_halo'] / 1e3:.1f} KB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--lengths", default="32768,65536", help="sequence lengths, comma-separated")
    ap.add_argument("--only", default="", help="only configurations whose name contains this")
    ap.add_argument("--set", action="append", default=[], help="extra dotted config override (repeatable)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--md")
    ap.add_argument("--json")
    args = ap.parse_args()
    from bench_train import versions as software  # this directory is on sys.path when run as a script

    v = software()
    versions = (f"{v.get('gpu', 'no GPU')}, driver {v.get('driver', '?')}, torch {v['torch']}, Triton {v['triton']}, "
                f"CUDA {v['cuda']}")
    work = Path(tempfile.mkdtemp(prefix="bench_cp_"))
    lengths = [int(x) for x in args.lengths.split(",")]
    comm = {s: comm_bytes_per_layer(args.preset, s, 2) for s in lengths}
    results, first = [], {}
    for seq, (gpus, mode) in ((s, r) for s in lengths for r in RUNS):
        name = f"seq {seq} {gpus} {mode}"
        if args.only and args.only not in name:
            continue
        r, why = run(args, seq, gpus, mode, not args.no_compile, work)
        if r is None and why == "error" and not args.no_compile:
            r, why = run(args, seq, gpus, mode, False, work)
        if r is None:
            results.append({"name": f"{args.preset} seq {seq}, {gpus} GPU(s) {mode or 'no CP'}", "failed": why})
            save(args, results, comm, versions)
            continue
        base = first.setdefault(seq, r)
        if r is not base:
            r["loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
        results.append(r)
        save(args, results, comm, versions)  # after every configuration: a timed-out command keeps the rest
    print(save(args, results, comm, versions))
    shutil.rmtree(work, ignore_errors=True)


def save(args, results: list[dict], comm: dict, versions: str) -> str:
    table = markdown(results, comm, versions)
    for path, text in ((args.md, table), (args.json, json.dumps(results, indent=2))):
        if path:
            Path(path).write_text(text)
    return table


if __name__ == "__main__":
    main()
