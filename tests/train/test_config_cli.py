"""Config building, the ``olmo-hybrid train`` command line, and bad inputs."""

from __future__ import annotations

import json

import pytest

from olmo_hybrid import checkpoint as ckpt
from olmo_hybrid.cli import main as olmo_hybrid
from olmo_hybrid.config import ConfigError, to_dict
from olmo_hybrid.data import DataError
from olmo_hybrid.train.config import build_config, train_preset
from olmo_hybrid.train.trainer import Trainer

from .conftest import make_config, quiet


def main(argv: list[str]) -> int:
    return olmo_hybrid(["train", *argv])


def test_default_is_the_tiny_hybrid_on_the_bundled_corpus():
    cfg = build_config()
    assert cfg == train_preset("tiny")
    assert cfg.data.path is None  # the bundled Shakespeare corpus
    assert "G" in cfg.model.layer_pattern and "A" in cfg.model.layer_pattern
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.eps == 1e-8 and cfg.optim.weight_decay == 0.1
    assert cfg.trainer.clip_grad == 1.0 and cfg.trainer.z_loss == 1e-5
    assert cfg.model.vocab_size >= cfg.data.bpe_vocab


def test_overrides_and_partial_json_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"optim": {"lr": 0.01}, "trainer": {"steps": 7}}))
    cfg = build_config(path, ["model.layer_pattern=GGGA", "optim.betas=[0.8,0.9]"])
    tiny = train_preset("tiny")
    assert cfg.optim.lr == 0.01 and cfg.trainer.steps == 7 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.layer_pattern == "GGGA" and cfg.model.d_model == tiny.model.d_model  # rest of the preset kept
    # The resolved config a run writes reads back to the same config.
    full = tmp_path / "full.json"
    full.write_text(json.dumps(to_dict(cfg)))
    assert build_config(full) == cfg


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1", "optim.lrr"), ("model.foo=1", "model.foo"), ("trainer.stepz=3", "trainer.stepz"),
    ("nosuch.x=1", "nosuch"), ("trainer.steps=many", "trainer.steps"), ("schedule.name=cosin", "schedule.name"),
])
def test_bad_overrides_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config(None, [override])


def test_unknown_key_in_json_names_the_dotted_field(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"trainer": {"steps": 3, "evall_interval": 5}}))
    with pytest.raises(ConfigError, match=r"trainer\.evall_interval"):
        build_config(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "missing.json")


def test_cli_reports_config_errors(capsys):
    assert main(["--dry-run", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_cli_dry_run_prints_resolved_config(capsys):
    assert main(["--dry-run", "--steps", "7", "model.layer_pattern=A", "optim.lr=3e-3"]) == 0
    printed = capsys.readouterr().out
    resolved = json.loads(printed[printed.index("{"):])
    assert resolved["trainer"]["steps"] == 7 and resolved["model"]["layer_pattern"] == "A"
    assert resolved["optim"]["lr"] == 3e-3
    assert set(resolved) == {"model", "data", "optim", "schedule", "trainer", "parallel"}


def test_cli_trains_exports_and_samples(corpus_dir, tmp_path, capsys):
    cfg = make_config(corpus_dir, "trainer.steps=3", "trainer.export_hf=true", "trainer.sample_tokens=8")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(to_dict(cfg)))
    out = tmp_path / "run"
    assert main([str(path), "--out", str(out), "--save-interval", "2"]) == 0
    printed = capsys.readouterr().out
    assert "unigram baseline" in printed and "validation loss" in printed and "sample (temperature 0.8" in printed
    assert (out / "hf" / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["trainer"]["save_interval"] == 2
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2, 3]
    # --resume on a finished run changes nothing and still reports.
    assert main([str(path), "--out", str(out), "--save-interval", "2", "--resume"]) == 0
    # The run directory and its HF export are both checkpoints for the other commands.
    capsys.readouterr()
    for checkpoint in (out, out / "hf"):
        assert olmo_hybrid(["info", str(checkpoint), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["model"]["params_total"] == cfg.model.num_params()


def test_missing_corpus_is_a_clear_error_and_keeps_the_run(corpus_dir, tmp_path, capsys):
    cfg = make_config(corpus_dir, "trainer.steps=2")
    Trainer(cfg, tmp_path, log=quiet).fit()
    with pytest.raises(DataError, match="does not exist"):
        Trainer(make_config(tmp_path / "nowhere"), tmp_path, resume=True, log=quiet)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no manifest.json"):
        Trainer(make_config(empty), tmp_path, resume=True, log=quiet)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(make_config(tmp_path / "nowhere"))))
    assert main([str(cfg_file), "--out", str(tmp_path), "--resume"]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(tmp_path).step == 2


def test_empty_corpus_is_refused_when_preparing(tmp_path):
    from olmo_hybrid.data.corpus import Document
    from olmo_hybrid.data.prepare import prepare

    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(None, tmp_path / "d", documents=[Document("  \n", "blank")], bpe_vocab=300, workers=1,
                progress=False)
    assert not (tmp_path / "d").exists()


def test_corpus_smaller_than_one_sequence(tiny_corpus_dir, tmp_path):
    with pytest.raises(DataError, match="fewer than one training sequence"):
        Trainer(make_config(tiny_corpus_dir, "model.vocab_size=300"), tmp_path, log=quiet)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_vocab_larger_than_the_model_is_refused(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.vocab_size=256 is smaller"):
        Trainer(make_config(corpus_dir, "model.vocab_size=256"), tmp_path, log=quiet)
