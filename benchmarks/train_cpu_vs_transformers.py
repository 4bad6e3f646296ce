"""CPU training speed: our HybridLM beside transformers' OlmoHybridForCausalLM, same weights, same process.

    python benchmarks/train_cpu_vs_transformers.py                  # tiny preset, batch 8 x seq 256
    python benchmarks/train_cpu_vs_transformers.py --rounds 9 --steps 3 --threads 1
    python benchmarks/train_cpu_vs_transformers.py --profile        # where each model's step goes

Both models are the tiny preset's (GGGA, d_model 256, 5.9M parameters) with our initial weights, copied into
transformers' model through our Hugging Face export; their logits are checked equal (1e-4 of the max) before any
timing. transformers runs its PyTorch fallbacks (no fla, no causal-conv1d package: the script refuses to run
with fla installed). A step is what the trainer does on CPU: forward, cross-entropy + 1e-5 z-loss on fp32
logits, backward, gradient clipping at 1.0, AdamW (foreach) and zero_grad.

Timing: ``--rounds`` rounds; in each, ``--steps`` steps of one model then of the other (the order alternates
between rounds, so a drift in machine load hits both). Reported: the median step time of each model over all
rounds, tokens/s from it, and the median of the per-round ratios. On a shared machine look at the spread and
the load average printed before and after; ``OMP_NUM_THREADS=1`` is often steadier than two threads that wait
on each other.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch

from olmo_hybrid.config import apply_overrides
from olmo_hybrid.model import HybridLM
from olmo_hybrid.train.config import train_preset
from olmo_hybrid.train.loss import loss_terms


def build(pattern: str, seed: int):
    cfg = apply_overrides(train_preset("tiny"), [f"model.layer_pattern={pattern}"]).model
    torch.manual_seed(seed)
    ours = HybridLM(cfg)
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = transformers.OlmoHybridForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return cfg, ours.train(), theirs.train()


def check_same_function(ours, theirs, vocab: int) -> float:
    x = torch.randint(0, vocab, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), theirs(input_ids=x).logits
    err = ((a - b).abs().max() / b.abs().max()).item()
    if err > 1e-4:
        raise SystemExit(f"the two models disagree (max error {err:.2e} of the max logit): not the same weights")
    return err


def trainer(model, logits_of, lr: float):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def step(x, y):
        ce, z, n = loss_terms(logits_of(x), y)
        ((ce + 1e-5 * z) / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_steps(step, x, y, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    return times


def profile(name: str, step, x, y, rows: int) -> None:
    from torch.profiler import profile as torch_profile

    with torch_profile() as prof:
        step(x, y)
    print(f"\n== {name}: one step, by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="GGGA")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps of one model per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--profile", action="store_true", help="after timing, profile one step of each")
    ap.add_argument("--profile-rows", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import fla  # noqa: F401
        raise SystemExit("fla is installed: transformers would not run its PyTorch fallbacks")
    except ImportError:
        pass
    import transformers

    cfg, ours, theirs = build(args.pattern, seed=0)
    err = check_same_function(ours, theirs, cfg.vocab_size)
    load0 = os.getloadavg()
    print(f"{datetime.date.today()}  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"pattern {args.pattern}, {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters, batch "
          f"{args.batch} x seq {args.seq}; logits agree to {err:.1e}; load average {load0[0]:.2f} {load0[1]:.2f}")
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]
    systems = {"ours": trainer(ours, ours, 3e-3),
               "transformers": trainer(theirs, lambda ids: theirs(input_ids=ids).logits, 3e-3)}
    for step in systems.values():
        time_steps(step, x, y, args.warmup)
    times = {name: [] for name in systems}
    ratios = []
    for r in range(args.rounds):
        order = list(systems) if r % 2 == 0 else list(systems)[::-1]
        per_round = {}
        for name in order:
            t = time_steps(systems[name], x, y, args.steps)
            times[name] += t
            per_round[name] = statistics.median(t)
        ratios.append(per_round["transformers"] / per_round["ours"])
        print(f"round {r + 1}: " + "  ".join(f"{n} {per_round[n] * 1e3:6.0f} ms" for n in systems)
              + f"  ratio {ratios[-1]:.2f}", flush=True)
    load1 = os.getloadavg()
    tokens = args.batch * args.seq
    print(f"\n{'system':<14}{'median ms/step':>16}{'min':>8}{'max':>8}{'tokens/s':>10}")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:<14}{med * 1e3:>16.0f}{min(t) * 1e3:>8.0f}{max(t) * 1e3:>8.0f}{tokens / med:>10.0f}")
    print(f"ours / transformers tokens/s: median of per-round ratios {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}); load average after {load1[0]:.2f} {load1[1]:.2f}")
    if args.profile:
        for name, step in systems.items():
            profile(name, step, x, y, args.profile_rows)


if __name__ == "__main__":
    main()
