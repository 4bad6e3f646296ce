"""Time and profile one training step (forward + backward + AdamW) of tiny models on the CPU.

    python benchmarks/train_step_cpu.py                       # the tiny preset's model, 3 patterns
    python benchmarks/train_step_cpu.py --profile GGGA        # where the time goes (torch.profiler)
    python benchmarks/train_step_cpu.py --shape d_model=192,mlp_hidden=576 --batch 16 --seq 256

Pin it to the cores you care about (``taskset -c 0,1``) and keep the machine otherwise idle: on a
busy 2-core machine OpenMP threads wait on each other and a step can take several times longer.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from olmo_hybrid.config import apply_overrides
from olmo_hybrid.model import HybridLM
from olmo_hybrid.train.config import train_preset
from olmo_hybrid.train.loss import loss_terms
from olmo_hybrid.train.optim import build_optimizer


def make(pattern: str, shape: list[str]):
    cfg = apply_overrides(train_preset("tiny"), [f"model.layer_pattern={pattern}", *[f"model.{s}" for s in shape]])
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    return cfg, model, build_optimizer(model, cfg.optim, torch.device("cpu"))


def step(model, opt, x, y):
    ce, z, n = loss_terms(model(x), y)
    ((ce + 1e-5 * z) / n).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("patterns", nargs="*", default=["GGGA", "A", "G"])
    ap.add_argument("--shape", default="", help="comma-separated model overrides, e.g. d_model=192,mlp_hidden=576")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    shape = [s for s in args.shape.split(",") if s]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x seq {args.seq}")
    for pattern in args.patterns:
        cfg, model, opt = make(pattern, shape)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=gen)
        inp, lab = x[:, :-1], x[:, 1:]
        step(model, opt, inp, lab)  # warm-up
        times = []
        for _ in range(args.steps):  # the minimum is the steadiest estimate on a shared machine
            t0 = time.perf_counter()
            step(model, opt, inp, lab)
            times.append(time.perf_counter() - t0)
        dt = min(times)
        n = sum(p.numel() for p in model.parameters())
        print(f"{pattern:8s} {dataclasses.asdict(cfg.model)['d_model']:4d}d {n / 1e6:5.2f}M params  "
              f"{dt * 1000:7.0f} ms/step (min of {args.steps})  {args.batch * args.seq / dt:7.0f} tokens/s", flush=True)
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                step(model, opt, inp, lab)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
