"""The experiment driver end to end on the CPU at toy scale: every piece once, nothing twice, the docs section."""

from __future__ import annotations

import json
import shutil

import pytest

from olmo_hybrid.cli import main as cli_main
from olmo_hybrid.data.corpus import bundled_corpus
from olmo_hybrid.errors import ConfigError
from olmo_hybrid.fsio import read_jsonl
from olmo_hybrid.longctx.experiment import done_pieces, load_experiment, plan_pieces, run_experiment
from olmo_hybrid.longctx.report import BEGIN, END

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.gdn_heads=2", "model.gdn_head_k=16",
         "model.gdn_head_v=16", "model.mlp_hidden=64", "trainer.eval_batches=1", "trainer.compile=false"]


@pytest.fixture
def config(tmp_path):
    text = "\n<|endoftext|>\n".join(w.text[:12_000] for w in bundled_corpus()[:6])
    (tmp_path / "books.txt").write_text(text)
    (tmp_path / "long_context.md").write_text(f"# Long context\n\nprose\n\n{BEGIN}\nold\n{END}\n\nmore prose\n")
    cfg = {"out": str(tmp_path / "out"), "results": str(tmp_path / "results.jsonl"),
           "docs": str(tmp_path / "long_context.md"), "device": "cpu",
           "archs": {"hybrid": "GA", "transformer": "A"}, "seeds": [0],
           "data": {"text": [str(tmp_path / "books.txt")], "bpe_vocab": 320, "val_fraction": 0.2},
           "base": {"model": "tiny", "seq_len": 128, "tokens": 1024, "batch_size": 4, "overrides": SMALL},
           "extend": {"seq_len": 512, "tokens": 1024, "methods": {"hybrid": ["drope"]}},
           "ruler": {"lengths": [256, 512], "tasks": ["niah_single_1", "vt"], "samples": 1, "max_new_tokens": 2}}
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(cfg))
    return path


def test_every_piece_runs_once_and_the_docs_section_is_written(config, tmp_path, capsys):
    cfg = load_experiment(config)
    assert not run_experiment(cfg, max_minutes=1.0, log=lambda *_: None)  # data only: too little time to train
    assert [r["key"] for _, r in read_jsonl(cfg.results)] == ["data"]
    assert cli_main(["longctx-experiment", str(config)]) == 0
    keys = [r["key"] for _, r in read_jsonl(cfg.results)]
    assert keys == [p.key for p in plan_pieces(cfg)]  # each piece once, in plan order
    assert len(keys) == 1 + 2 + 1 + 3 * 2  # data, two base runs, one extension, three models at two lengths
    records = {r["key"]: r for _, r in read_jsonl(cfg.results)}
    base = records["ruler:hybrid:base:s0:512"]
    assert base["past_window"] and base["window"] == 128  # the unextended model, measured past its window
    assert not records["ruler:hybrid:drope:s0:512"]["past_window"]
    assert "vt" in records["ruler:transformer:base:s0:256"]["skipped"]  # too short for its in-context example
    capsys.readouterr()
    assert cli_main(["longctx-experiment", str(config)]) == 0  # everything is done: nothing runs again
    assert "10 of 10 pieces done; 0 to run" in capsys.readouterr().out
    docs = (tmp_path / "long_context.md").read_text()
    assert docs.startswith("# Long context\n\nprose\n\n") and docs.endswith(f"{END}\n\nmore prose\n")
    assert "| hybrid + DRoPE |" in docs and "| 85.0 |" in docs and "### RULER average by length" in docs
    assert "old" not in docs.split(BEGIN)[1]
    # On a fresh machine the run directories are gone: a piece still to run makes its recorded inputs again.
    shutil.rmtree(tmp_path / "out")
    kept = [r for _, r in read_jsonl(cfg.results) if not r["key"].startswith("ruler:hybrid:drope")]
    cfg_results = tmp_path / "results.jsonl"
    cfg_results.write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert run_experiment(cfg, log=lambda *_: None)
    assert [r["key"] for _, r in read_jsonl(cfg.results)] == [r["key"] for r in kept] + [
        "ruler:hybrid:drope:s0:256", "ruler:hybrid:drope:s0:512"]  # the remade inputs are not recorded twice
    assert (tmp_path / "out" / "runs" / "hybrid-s0" / "drope" / "hf").is_dir()
    with pytest.raises(ConfigError, match="recorded with other settings"):
        changed = load_experiment(config, ["ruler.samples=2"])
        done_pieces(changed, plan_pieces(changed))
