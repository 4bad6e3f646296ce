"""``olmo-hybrid dpo SOURCE PAIRS [--out DIR] [CONFIG.json] [section.field=value ...]``: direct preference optimisation.

SOURCE is a training run directory or a Hugging Face checkpoint (typically an SFT run's ``hf/``); PAIRS is a JSONL
file of ``{"prompt" | "messages", "chosen", "rejected"}`` (or a ``datasets`` dataset). Recipe defaults (OLMo
Hybrid's Instruct-DPO): the length-normalised ``dpo_norm`` loss with beta 5, lr 1e-6, 10% warmup then linear
decay, weight decay 0, 1 epoch; the reference is the source model, scored once before training
(``dpo.reference=model`` keeps a frozen copy instead). Each step logs the loss, reward accuracy and margins.
"""

from __future__ import annotations

import sys

EXAMPLES = """examples:
  olmo-hybrid dpo runs/tiny-sft/hf pairs.jsonl --out runs/tiny-dpo
  olmo-hybrid dpo runs/tiny-sft/hf pairs.jsonl --out runs/tiny-dpo dpo.loss=dpo dpo.beta=0.1 optim.lr=5e-7
  olmo-hybrid dpo runs/tiny-sft/hf pairs.jsonl --out runs/tiny-dpo --resume
"""


def main(argv: list[str]) -> int:
    from olmo_hybrid.cli.posttrain_common import run_posttrain

    return run_posttrain("dpo", argv, __doc__, EXAMPLES)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
