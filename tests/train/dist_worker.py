"""Started by tests/train/test_distributed.py under torchrun: train a JSON config in a run directory,
optionally SIGKILLing one rank just before a given step (a crashed node, not a clean exit)."""

import argparse
import json
import os
import signal

from olmo_hybrid.config import from_dict
from olmo_hybrid.train.config import TrainConfig
from olmo_hybrid.train.distributed import destroy
from olmo_hybrid.train.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("run_dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-before-step", type=int, default=0)
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
    trainer.fit()
    destroy()


if __name__ == "__main__":
    main()
