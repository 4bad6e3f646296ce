"""RULER over lengths with a small vocabulary at short lengths: multiples of the training length, tasks that cannot
be built reported as skipped, results written as they finish, and lengths past the model's window on request."""

from __future__ import annotations

import json

import torch

from olmo_hybrid.cli import main as cli_main
from olmo_hybrid.config import ModelConfig, to_dict
from olmo_hybrid.data import load_tokenizer
from olmo_hybrid.eval.runner import EvalRunner
from olmo_hybrid.model import HybridLM
from olmo_hybrid.train.config import TrainConfig, merge_config

TASKS = "niah_single_1,niah_multikey_3,vt"


def make_run(root, corpus, window: int):
    """A run directory trained at 256 tokens (data.seq_len) with the corpus's 384-id BPE, built without training."""
    from olmo_hybrid.checkpoint import save_checkpoint

    cfg = ModelConfig(vocab_size=384, d_model=32, n_layers=2, layer_pattern="GA", n_heads=2, gdn_heads=2,
                      gdn_head_k=16, gdn_head_v=16, mlp_hidden=64, rope_theta=10_000.0, max_seq_len=window)
    train_cfg = merge_config(TrainConfig(model=cfg), {"data": {"path": str(corpus), "seq_len": 256}})
    torch.manual_seed(0)
    model = HybridLM(cfg)
    run = root / f"run{window}"
    save_checkpoint(run, 1, model=model, optimizer=torch.optim.AdamW(model.parameters()), train_state={"tokens": 0},
                    config=to_dict(train_cfg))
    (run / "config.json").write_text(json.dumps(to_dict(train_cfg)))
    load_tokenizer(corpus).save(run)
    return run


def ruler_args(run, out, *extra):
    return ["eval", str(run), "--suite", "ruler,bpb", "--out", str(out), "--quiet", "--no-plot", "--ruler-tasks",
            TASKS, "--lengths", "2x,4x", "--samples", "1", "--ruler-max-new-tokens", "2", "--max-docs", "1", *extra]


def test_tasks_that_cannot_be_built_are_skipped_with_their_reason(corpus, tmp_path):
    # Variable tracking's 500-token in-context example leaves no room at 512: skipped there, the rest scored (a
    # uuid line of ~100 tokens with 384 BPE ids cannot land within 1% of 512, but the largest sample that fits is
    # RULER's sample too).
    run, out = make_run(tmp_path, corpus, window=1024), tmp_path / "out"
    assert cli_main(ruler_args(run, out)) == 0
    ruler = json.loads((out / "ruler.json").read_text())
    assert ruler["complete"] and set(ruler["scores"]["niah_single_1"]) == {"512", "1024"}  # 2x, 4x of 256
    assert set(ruler["scores"]["niah_multikey_3"]) == {"512", "1024"}
    assert "too short" in ruler["skipped"]["vt"]["512"] and "1024" in ruler["scores"]["vt"]
    n512 = ruler["scores"]["niah_single_1"]["512"]
    assert ruler["ruler_average"]["512"] == n512  # averaged over the tasks scored at that length
    summary = json.loads((out / "results.json").read_text())
    assert summary["suites"]["bpb"]["bpb"] > 0 and "vt" in summary["suites"]["ruler"]["skipped"]
    assert "| vt | skipped |" in (out / "ruler.md").read_text()


def test_results_are_kept_when_a_later_task_fails(corpus, tmp_path, monkeypatch, capsys):
    run, out = make_run(tmp_path, corpus, window=1024), tmp_path / "out"
    real, calls = EvalRunner.generate_greedy, []

    def fail_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EvalRunner, "generate_greedy", fail_second)
    assert cli_main(ruler_args(run, out)) == 1
    assert "simulated failure" in capsys.readouterr().err
    partial = json.loads((out / "ruler.json").read_text())
    assert not partial["complete"] and list(partial["scores"]["niah_single_1"]) == ["512"]


def test_lengths_past_the_window_need_the_flag(corpus, tmp_path, capsys):
    run, out = make_run(tmp_path, corpus, window=512), tmp_path / "out"
    assert cli_main(ruler_args(run, out)) == 2
    err = capsys.readouterr().err
    assert "exceed the model's window of 512" in err and "--past-window" in err
    assert cli_main(ruler_args(run, out, "--past-window")) == 0
    assert set(json.loads((out / "ruler.json").read_text())["scores"]["niah_single_1"]) == {"512", "1024"}
