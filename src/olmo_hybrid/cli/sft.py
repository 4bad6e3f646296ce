"""``olmo-hybrid sft SOURCE DATA [--out DIR] [CONFIG.json] [section.field=value ...]``: supervised fine-tuning.

SOURCE is a training run directory or a Hugging Face checkpoint; DATA is a JSONL file of
``{"messages": [{"role", "content"}, ...]}`` conversations (or a ``datasets`` dataset: a saved directory or a hub
name). The loss covers assistant tokens only; conversations are packed into rows of ``data.seq_len`` tokens with
attention and GDN state kept inside each conversation. Recipe defaults (OLMo Hybrid's SFT): 2 epochs, lr 2.5e-5,
3% warmup then linear decay. The run directory holds checkpoints (``--resume`` continues exactly) and, at the
end, ``hf/``: a Hugging Face checkpoint whose tokenizer_config.json carries the chat template.
"""

from __future__ import annotations

import sys

EXAMPLES = """examples:
  olmo-hybrid sft runs/tiny chat.jsonl --out runs/tiny-sft
  olmo-hybrid sft runs/tiny chat.jsonl --out runs/tiny-sft optim.lr=1e-3 sft.epochs=3 data.seq_len=512
  olmo-hybrid sft path/to/Olmo-Hybrid-7B chat.jsonl --chat-template my_template.jinja --out runs/7b-sft
  olmo-hybrid sft runs/tiny chat.jsonl --out runs/tiny-sft --resume
"""


def main(argv: list[str]) -> int:
    from olmo_hybrid.cli.posttrain_common import run_posttrain

    return run_posttrain("sft", argv, __doc__, EXAMPLES)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
