"""CPU training speed: our HybridLM beside transformers' OlmoHybridForCausalLM, same weights, same process.

    python benchmarks/train_cpu_vs_transformers.py                  # tiny preset, batch 8 x seq 256
    python benchmarks/train_cpu_vs_transformers.py --rounds 9 --steps 3 --threads 1
    python benchmarks/train_cpu_vs_transformers.py --profile 4      # where each model's step goes

Both models are the tiny preset's (GGGA, d_model 256, 5.9M parameters) with our initial weights, copied into
transformers' model through our Hugging Face export; their logits are checked equal (1e-4 of the max) before any
timing. transformers runs its PyTorch fallbacks (no fla, no causal-conv1d package: the script refuses to run
with fla installed). A step is what our trainer does on CPU: forward, cross-entropy + 1e-5 z-loss, backward,
gradient clipping at 1.0, AdamW (foreach) and zero_grad. Both compute the same loss; transformers from its
logits (``loss_terms``), ours the way the tiny preset's trainer does (``trainer.loss_chunk_tokens``: the loss
and its gradient a chunk of tokens at a time, never all logits), or from logits too with ``--same-loss``.

Timing: ``--rounds`` rounds; in each, ``--steps`` steps of one model then of the other (the order alternates
between rounds, so a drift in machine load hits both). Reported: the median step time of each model over all
rounds, wall clock and process CPU time, tokens/s from them, and the medians of the per-round ratios. On a
shared machine look at the spread and the load average printed before and after; with one thread the CPU time
leaves out the time other processes held the core, with two it adds the threads' time together.
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
from olmo_hybrid.train.loss import chunked_lm_loss, loss_terms


def build(pattern: str, seed: int):
    cfg = apply_overrides(train_preset("tiny"), [f"model.layer_pattern={pattern}"])
    torch.manual_seed(seed)
    ours = HybridLM(cfg.model)
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


def loss_from_logits(logits_of):
    def loss(x, y):
        ce, z, n = loss_terms(logits_of(x), y)
        return (ce + 1e-5 * z) / n
    return loss


def chunked_loss(model, chunk: int):
    def loss(x, y):
        return model(x, lm_head_fn=lambda h, head: chunked_lm_loss(h, head.weight, y, 1e-5, 1 / y.numel(), chunk))[0]
    return loss


def trainer(model, loss_of, lr: float):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def step(x, y):
        loss_of(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_steps(step, x, y, n: int) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each of ``n`` steps."""
    times = []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        step(x, y)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def profile(systems: dict, x, y, steps: int, rows: int) -> None:
    """Self CPU time per step of the busiest operators of each system, side by side (torch.profiler)."""
    from torch.profiler import profile as torch_profile

    per_op = {}
    for name, step in systems.items():
        with torch_profile() as prof:
            for _ in range(steps):
                step(x, y)
        per_op[name] = {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()}
    names = list(systems)
    ops = sorted(set().union(*per_op.values()), key=lambda op: -max(per_op[n].get(op, (0, 0))[0] for n in names))
    print(f"\nprofile, mean of {steps} steps: self CPU ms per step (calls per step)")
    print(f"{'operator':<52}" + "".join(f"{n:>22}" for n in names))
    for op in ops[:rows]:
        print(f"{op[:51]:<52}" + "".join(f"{per_op[n].get(op, (0, 0))[0]:>14.1f} ({per_op[n].get(op, (0, 0))[1]:>4.0f})"
                                         for n in names))
    totals = {n: sum(ms for ms, _ in per_op[n].values()) for n in names}
    print(f"{'total':<52}" + "".join(f"{totals[n]:>14.1f}       " for n in names))
    print(f"{'aten::mm share (the linear layers)':<52}"
          + "".join(f"{per_op[n].get('aten::mm', (0, 0))[0] / totals[n]:>14.0%}       " for n in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="GGGA")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps of one model per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--same-loss", action="store_true", help="ours computes the loss from all logits too")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after timing, profile this many steps of each model")
    ap.add_argument("--profile-rows", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import fla  # noqa: F401
        raise SystemExit("fla is installed: transformers would not run its PyTorch fallbacks")
    except ImportError:
        pass
    import transformers

    cfg, ours, theirs = build(args.pattern, seed=0)
    err = check_same_function(ours, theirs, cfg.model.vocab_size)
    chunk = 0 if args.same_loss else cfg.trainer.loss_chunk_tokens
    load0 = os.getloadavg()
    print(f"{datetime.date.today()}  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"pattern {args.pattern}, {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters, batch "
          f"{args.batch} x seq {args.seq}; logits agree to {err:.1e}; our loss "
          f"{f'in chunks of {chunk} tokens' if chunk else 'from logits'}; load average {load0[0]:.2f} {load0[1]:.2f}")
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]
    lr = cfg.optim.lr
    systems = {"ours": trainer(ours, chunked_loss(ours, chunk) if chunk else loss_from_logits(ours), lr),
               "transformers": trainer(theirs, loss_from_logits(lambda ids: theirs(input_ids=ids).logits), lr)}
    for step in systems.values():
        time_steps(step, x, y, args.warmup)
    times = {name: [] for name in systems}
    ratios = {"wall": [], "cpu": []}
    for r in range(args.rounds):
        order = list(systems) if r % 2 == 0 else list(systems)[::-1]
        per_round = {}
        for name in order:
            t = time_steps(systems[name], x, y, args.steps)
            times[name] += t
            per_round[name] = [statistics.median(c) for c in zip(*t)]
        for i, kind in enumerate(ratios):
            ratios[kind].append(per_round["transformers"][i] / per_round["ours"][i])
        print(f"round {r + 1}: " + "  ".join(f"{n} {per_round[n][0] * 1e3:5.0f} ms ({per_round[n][1] * 1e3:5.0f} cpu)"
                                             for n in systems)
              + f"  ratio {ratios['wall'][-1]:.2f} ({ratios['cpu'][-1]:.2f} cpu)", flush=True)
    load1 = os.getloadavg()
    tokens = args.batch * args.seq
    print(f"\n{'system':<14}{'wall ms/step: median':>22}{'min':>7}{'max':>7}{'tokens/s':>10}"
          f"{'CPU ms/step: median':>22}{'tokens/CPU-s':>14}")
    for name, t in times.items():
        wall, cpu = zip(*t)
        print(f"{name:<14}{statistics.median(wall) * 1e3:>22.0f}{min(wall) * 1e3:>7.0f}{max(wall) * 1e3:>7.0f}"
              f"{tokens / statistics.median(wall):>10.0f}{statistics.median(cpu) * 1e3:>22.0f}"
              f"{tokens / statistics.median(cpu):>14.0f}")
    for kind, r in ratios.items():
        print(f"ours / transformers speed ({kind} time): median of per-round ratios {statistics.median(r):.2f} "
              f"(range {min(r):.2f}-{max(r):.2f})")
    print(f"load average after {load1[0]:.2f} {load1[1]:.2f}")
    if args.profile:
        profile(systems, x, y, args.profile, args.profile_rows)


if __name__ == "__main__":
    main()
