"""Training throughput of the real trainer on GPUs: tokens/s per GPU, MFU and peak memory.

    # one GPU: the 1b hybrid, the 3:1 hybrid Mamba2 and the same-width/depth transformer at seq 4096 and 8192
    python benchmarks/bench_train.py single --steps 20 --md $OUT/train_1gpu.md
    # only the GDN hybrid beside the hybrid Mamba2 (MMMA, the paper's baseline; Triton SSD kernels)
    python benchmarks/bench_train.py single --only hybrid --steps 20
    # long sequences on one GPU: the 1b hybrid and transformer at 16k, 32k and 64k tokens (one sequence per step,
    # window 65,536, activation checkpointing and the chunked loss via --set), with the longctx memory estimate
    python benchmarks/bench_train.py long --steps 8 --set trainer.activation_checkpointing=full --md $OUT/long.md
    # two GPUs (run it without torchrun; it starts torchrun itself): 190m hybrid, FSDP2, save,
    # then resume the step-S checkpoint on one GPU and compare the next steps' losses
    python benchmarks/bench_train.py dist --gpus 2 --steps 40 --md $OUT/train_2gpu.md

What runs is ``olmo_hybrid.train.Trainer`` itself (loader, forward, chunked loss, backward, clipping,
AdamW), with per-block ``torch.compile`` and the GDN backend named by ``--gdn-backend`` (default
triton; ``fla`` takes fla's gated delta rule and keeps our short-conv kernel, eager only since fla's ops are
not custom ops; the transformer has no GDN layers). Data: the bundled Shakespeare corpus with the dolma2
tokenizer (100k vocabulary), prepared on first use. Each ``single`` configuration runs in its own
process (clean peak-memory counters; an out-of-memory micro-batch is retried at half the size).

The hybrid Mamba2 (``layer_pattern=MMMA``) puts the ladder's Mamba2 mixer (``config._ladder``: 16 heads of 256,
state 128, one group, expand 2) where the hybrid has GDN, same blocks and MLP; its ops run on the backend
``--gdn-backend`` names too (fla has no SSD: use triton). The transformer keeps the hybrid's width, depth, heads
and MLP and makes every layer attention (``layer_pattern=A``): it has fewer parameters (a GDN mixer holds q/k of 2048 and v/g of 4096 columns,
attention four 2048 x 2048 matrices) and fewer FLOPs per token. Both tokens/s and MFU (which counts
each model's own FLOPs, ``ModelConfig.flops_per_token``, the ``olmo-hybrid info`` figure) are shown.

Timing: a step does not wait for the device (its loss and gradient norm are read back in a batch, as the
trainer does at its log interval), so the first ``--warmup`` steps (compilation, autotuning) run and are
synchronised, then ``--steps`` steps are timed as one block ending with a device sync and their mean is
reported. ``--profile`` adds a torch.profiler table of the top kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
SINGLE_CONFIGS = [  # (name, layer pattern, seq_len, micro-batch sizes to try, largest first)
    ("1b hybrid", "GGGA", 4096, [2, 1]),
    ("1b hybrid-mamba2", "MMMA", 4096, [2, 1]),
    ("1b transformer", "A", 4096, [2, 1]),
    ("1b hybrid", "GGGA", 8192, [1]),
    ("1b hybrid-mamba2", "MMMA", 8192, [1]),
    ("1b transformer", "A", 8192, [1]),
]
LONG_CONFIGS = [(name, pattern, seq, [1]) for seq in (16384, 32768, 65536)
                for name, pattern in (("1b hybrid", "GGGA"), ("1b transformer", "A"))]


def build_config(preset: str, pattern: str, seq_len: int, batch: int, steps: int, compile: bool, extra: list[str]):
    from olmo_hybrid.train.config import build_config as build

    return build(model=preset, overrides=[
        f"model.layer_pattern={pattern}", f"data.seq_len={seq_len}", f"data.batch_size={batch}", "data.bpe_vocab=0",
        f"trainer.steps={steps}", f"trainer.compile={compile}", "trainer.loss_chunk_tokens=8192",
        "trainer.eval_interval=0", "trainer.sample_tokens=0", "trainer.export_hf=false", "trainer.max_minutes=0",
        "trainer.log_interval=10", "schedule.warmup_steps=10", "optim.lr=3e-4", "optim.decay_rule=all_but_embeddings",
        *extra])


def versions() -> dict:
    import triton

    out = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            out["driver"] = smi.stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            out["driver"] = "?"
    return out


# --------------------------------------------------------------------------------------------------
# One configuration on one GPU (a child process)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_one(args) -> dict:
    from olmo_hybrid.train.metrics import read_back
    from olmo_hybrid.train.trainer import Trainer

    cfg = build_config(args.preset, args.pattern, args.seq, args.batch, args.warmup + args.steps,
                       not args.no_compile, args.set)
    with tempfile.TemporaryDirectory() as run_dir, gdn_backend(args.gdn_backend):
        trainer = Trainer(cfg, run_dir)
        trainer.model.train()
        t0 = time.perf_counter()
        outputs = [trainer.train_step() for _ in range(args.warmup)]
        _sync()
        t1 = time.perf_counter()
        outputs += [trainer.train_step() for _ in range(args.steps)]
        _sync()
        t2 = time.perf_counter()
        losses = [r["loss"] for r in read_back(outputs)]
        profile = profile_steps(trainer, args.profile) if args.profile else None
    tokens = cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.grad_accum
    step_s = (t2 - t1) / args.steps
    m = cfg.model
    out = {
        "name": args.name, "pattern": m.layer_pattern, "seq_len": cfg.data.seq_len, "batch": cfg.data.batch_size,
        "compile": not args.no_compile, "gdn_backend": args.gdn_backend if m.n_gdn_layers else "-",
        "params_nonemb": m.num_params(embeddings=False), "flops_per_token": m.flops_per_token(cfg.data.seq_len),
        "step_s": step_s, "tokens_per_s": tokens / step_s,
        "mfu": (tokens / step_s) * m.flops_per_token(cfg.data.seq_len) / trainer.peak_flops if trainer.peak_flops else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        "estimated_mem_gib": estimated_gib(cfg),
        "activation_checkpointing": cfg.trainer.activation_checkpointing,
        "first_loss": losses[0], "last_loss": losses[-1],
        "warmup_s": t1 - t0, "steps": args.steps, **versions(),
    }
    if profile:
        out["profile"] = profile
    return out


def estimated_gib(cfg) -> float:
    """The up-front estimate ``olmo-hybrid extend`` checks a length against (olmo_hybrid.longctx.memory)."""
    from olmo_hybrid.longctx import estimate_training_memory

    return estimate_training_memory(cfg, "cuda").total / 2**30


@contextlib.contextmanager
def gdn_backend(name: str):
    """Within the block, the GDN ops run on ``name``. fla has the gated delta rule but no short convolution, so
    with ``fla`` the gated delta rule is fla's and the convolution stays on our Triton kernel: the comparison
    isolates the GDN kernel."""
    from olmo_hybrid import ops

    if name != "fla":
        with ops.use_backend(name):
            yield
        return
    if "fla" not in ops.available_backends("gated_delta_rule"):
        raise SystemExit("--gdn-backend fla: fla is not importable here (carry the .whl wheels)")
    with ops.use_backend("triton"), ops.use_backend("fla", ops=("gated_delta_rule",)):
        yield


def profile_steps(trainer, n_steps: int) -> str:
    """torch.profiler over ``n_steps`` training steps: the kernels that take the most GPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n_steps):
            trainer.train_step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)


def single(args, configs=SINGLE_CONFIGS) -> list[dict]:
    results = []
    for name, pattern, seq, batches in configs:
        if args.only and args.only not in f"{name} {seq}":
            continue
        compile = not args.no_compile
        for batch in batches:
            r, why = run_child(args, name, pattern, seq, batch, compile,
                               profile=args.profile if pattern != "A" and seq == 4096 else 0)
            if r is None and why == "error" and compile:  # a compile failure must not lose the data point
                print("   retrying without torch.compile", flush=True)
                r, why = run_child(args, name, pattern, seq, batch, False,
                                   profile=args.profile if pattern != "A" and seq == 4096 else 0)
            if r is not None:
                results.append(r)
                save_reports(args, results)  # after every configuration: a timed-out command keeps the rest
                break
            if why != "oom":
                break
    return results


def run_child(args, name, pattern, seq, batch, compile, profile) -> tuple[dict | None, str]:
    """One configuration in a fresh process: (result, "") or (None, "oom" | "error")."""
    cmd = [sys.executable, str(HERE), "one", "--name", name, "--pattern", pattern, "--seq", str(seq),
           "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--gdn-backend", args.gdn_backend, "--preset", args.preset, "--profile", str(profile)]
    cmd += [] if compile else ["--no-compile"]
    for s in args.set:
        cmd += ["--set", s]
    print(f"== {name} seq {seq} batch {batch} compile {compile}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"   timed out after {args.timeout} s", flush=True)
        return None, "timeout"
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if line:
        r = json.loads(line[7:])
        r["wall_s"] = time.perf_counter() - t0
        if "profile" in r:
            print(r.pop("profile"))
        print(json.dumps(r), flush=True)
        return r, ""
    oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
    print(f"   failed ({'out of memory' if oom else 'error'}): {proc.stderr[-2500:]}", flush=True)
    return None, "oom" if oom else "error"


# --------------------------------------------------------------------------------------------------
# Several GPUs: torchrun train + save, then resume on one GPU


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def dist(args) -> list[dict]:
    seq, batch = args.seq, args.batch
    save_at = args.steps // 2
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cfg = build_config(args.preset, "GGGA", seq, batch, args.steps, not args.no_compile,
                       [f"trainer.save_interval={save_at}", "trainer.keep_last_k=0", "trainer.log_interval=5",
                        *args.set])
    from olmo_hybrid.config import to_dict

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_TRAIN_GDN_BACKEND": args.gdn_backend}
    cfg_file = work / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    run = work / "run"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
           str(HERE), "train", str(cfg_file), str(run)]
    subprocess.run(cmd, check=True, timeout=args.timeout, env=env)
    wall = time.perf_counter() - t0
    multi = metrics(run)
    # Resume the middle checkpoint on one GPU with the same global batch (batch x gpus sequences).
    resumed_run = work / "resumed"
    shutil.copytree(run, resumed_run, ignore=shutil.ignore_patterns("hf"))
    for d in (resumed_run / "checkpoints").iterdir():
        if d.name != f"step_{save_at:06d}":
            shutil.rmtree(d)
    one = build_config(args.preset, "GGGA", seq, batch * args.gpus, args.steps, not args.no_compile,
                       [f"trainer.save_interval={save_at}", "trainer.keep_last_k=0", "trainer.log_interval=5",
                        *args.set])
    one_file = work / "cfg1.json"
    one_file.write_text(json.dumps(to_dict(one)))
    subprocess.run([sys.executable, str(HERE), "train", str(one_file), str(resumed_run), "--resume"], check=True,
                   timeout=args.timeout, env=env)
    single_gpu = metrics(resumed_run)
    steady = [r for r in multi if r["step"] > args.warmup]
    res = {
        "name": f"{args.preset} hybrid, {args.gpus} GPUs FSDP2", "seq_len": seq, "batch_per_gpu": batch,
        "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s_per_device"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady) if steady[0].get("mfu") is not None else None,
        "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in multi), "wall_s": wall,
        "loss_first": multi[0]["loss"], "loss_last": multi[-1]["loss"],
        "resume_step": save_at + 1,
        "loss_next_multi": multi[save_at]["loss"], "loss_next_single": single_gpu[save_at]["loss"],
        "loss_last_single": single_gpu[-1]["loss"],
        "single_tokens_per_s": statistics.median(r["tokens_per_s_per_device"] for r in single_gpu[save_at + 2:]),
        "checkpoint_files": sorted(p.name for p in (run / "checkpoints" / f"step_{save_at:06d}" / "model_and_optim").iterdir()),
        **versions(),
    }
    print(json.dumps(res), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return [res]


def train_entry(argv: list[str]) -> None:
    """``bench_train.py train CFG RUN [--resume]``: the trainer under the requested GDN backend (torchrun target)."""
    from olmo_hybrid.config import from_dict
    from olmo_hybrid.train.config import TrainConfig
    from olmo_hybrid.distributed import destroy
    from olmo_hybrid.train.trainer import train

    cfg = from_dict(TrainConfig, json.loads(Path(argv[0]).read_text()))
    with gdn_backend(os.environ.get("BENCH_TRAIN_GDN_BACKEND", "auto")):
        train(cfg, argv[1], resume="--resume" in argv)
    destroy()


# --------------------------------------------------------------------------------------------------
# Report


def markdown(results: list[dict]) -> str:
    if not results:
        return "(no results)\n"
    v = results[0]
    head = (f"{v.get('gpu', '?')}, driver {v.get('driver', '?')}, torch {v['torch']}, Triton {v['triton']}, "
            f"CUDA {v['cuda']}\n\n")
    if "tokens_per_s" in v:
        lines = ["| model | non-emb params | seq | micro-batch | GDN backend | compile | act. ckpt | step (ms) | "
                 "tokens/s/GPU | MFU | peak mem (GiB) | estimate (GiB) | loss first -> last |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            est = f"{r['estimated_mem_gib']:.1f}" if r.get("estimated_mem_gib") is not None else "-"
            lines.append(f"| {r['name']} | {r['params_nonemb'] / 1e9:.2f}B | {r['seq_len']} | {r['batch']} | "
                         f"{r['gdn_backend']} | {r['compile']} | {r.get('activation_checkpointing', '-')} | "
                         f"{1000 * r['step_s']:.0f} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} | "
                         f"{est} | {r['first_loss']:.2f} -> {r['last_loss']:.2f} |")
    else:
        lines = ["| run | seq | batch/GPU | tokens/s/GPU | MFU | peak mem (GiB) | loss first -> last | resume: next-step "
                 "loss (N GPUs / 1 GPU) | 1-GPU tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            lines.append(f"| {r['name']} | {r['seq_len']} | {r['batch_per_gpu']} | {r['tokens_per_s_per_gpu']:,.0f} | "
                         f"{mfu} | {r['peak_mem_gib']:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | step "
                         f"{r['resume_step']}: {r['loss_next_multi']:.4f} / {r['loss_next_single']:.4f} | "
                         f"{r['single_tokens_per_s']:,.0f} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        return train_entry(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["single", "long", "one", "dist"])
    ap.add_argument("--preset", default=None, help="model preset (default: 1b for single, 190m for dist)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--gdn-backend", default="triton", choices=["auto", "torch", "triton", "fla"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps after timing (hybrid only)")
    ap.add_argument("--set", action="append", default=[], help="extra dotted config override (repeatable)")
    ap.add_argument("--md", help="write the markdown table here")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--only", default="", help="single: only configurations whose 'name seq' contains this")
    ap.add_argument("--timeout", type=int, default=900)
    # one / dist
    ap.add_argument("--name", default="")
    ap.add_argument("--pattern", default="GGGA")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=2)
    args = ap.parse_args()
    if args.mode == "one":
        args.preset = args.preset or "1b"
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    if args.mode in ("single", "long"):
        args.preset = args.preset or "1b"
        if args.mode == "long":  # the window the longest configuration needs
            args.set = ["model.max_seq_len=65536", *args.set]
        results = single(args, LONG_CONFIGS if args.mode == "long" else SINGLE_CONFIGS)
    else:
        args.preset = args.preset or "190m"
        results = dist(args)
    print(save_reports(args, results))


def save_reports(args, results: list[dict]) -> str:
    table = markdown(results)
    if args.md:
        Path(args.md).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return table


if __name__ == "__main__":
    main()
