"""Started by tests/train/test_distributed.py under torchrun: train a JSON config in a run directory,
optionally SIGKILLing one rank just before a given step (a crashed node, not a clean exit), or making one
step's gradients infinite (then rank 0 prints the optimizer's step counts)."""

import argparse
import json
import os
import signal

from olmo_hybrid.config import from_dict
from olmo_hybrid.distributed import destroy
from olmo_hybrid.train.config import TrainConfig
from olmo_hybrid.train.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("run_dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-before-step", type=int, default=0)
    p.add_argument("--poison-step", type=int, default=0)
    args = p.parse_args()
    with open(args.config) as f:
        cfg = from_dict(TrainConfig, json.load(f))
    trainer = Trainer(cfg, args.run_dir, resume=args.resume)
    if trainer.env.rank == args.kill_rank:
        real_step = trainer.train_step

        def step_or_die():
            if trainer.step + 1 == args.kill_before_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step()

        trainer.train_step = step_or_die
    if args.poison_step:
        def poison(grad):
            return grad * float("inf") if trainer.step + 1 == args.poison_step else grad

        for p in trainer.model.parameters():
            p.register_hook(poison)
    trainer.fit()
    if args.poison_step and trainer.env.is_main:
        counts = sorted({int(s["step"]) for s in trainer.optimizer.state.values()})
        print(f"optimizer steps {', '.join(map(str, counts))}", flush=True)
    destroy()


if __name__ == "__main__":
    main()
