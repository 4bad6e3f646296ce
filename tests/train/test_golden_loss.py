"""Golden losses: the first 20 steps of the ``smoke`` recipe on the CPU, checked against a committed file.

A refactor that changes the model's or the trainer's math (initialisation, forward, loss, optimizer, data order)
changes these losses and fails here. The tolerance (1e-5 relative) allows the last bits to differ between CPU
kinds and PyTorch builds; a change of the math moves the losses by far more (one extra step of one rounding per
parameter already gives ~1e-4 by step 20). Regenerate only for an intended change of the math:
``python tests/train/test_golden_loss.py --write`` (and say why in the commit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "smoke_losses.json"
# Validation, sampling and export do not change the training losses; they are off to keep the test fast.
OVERRIDES = ["trainer.device=cpu", "trainer.eval_interval=0", "trainer.eval_batches=1", "trainer.sample_tokens=0",
             "trainer.export_hf=false", "trainer.save_interval=0"]


def smoke_losses(run_dir: Path) -> list[float]:
    from olmo_hybrid.train import build_config, train

    cfg = build_config(preset="smoke", overrides=OVERRIDES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same reduction order on every machine
    try:
        result = train(cfg, run_dir, log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(threads)
    return result.losses


def test_smoke_recipe_losses_match_the_golden_file(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = smoke_losses(tmp_path / "run")
    want = golden["losses"]
    assert len(got) == len(want) == 20
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    assert worst <= 1e-5, f"losses moved by up to {worst:.2e} relative:\n got {got}\nwant {want}"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        losses = smoke_losses(Path(d) / "run")
    GOLDEN.write_text(json.dumps({"recipe": "smoke", "overrides": OVERRIDES, "torch": torch.__version__,
                                  "losses": losses}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {losses}")
