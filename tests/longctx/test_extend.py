"""``extend``: the stage's config, an exact resume after a kill, and its output loading everywhere."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
import torch
from .conftest import BASE_LEN, quiet

from olmo_hybrid.checkpoint import load_model_and_tokenizer
from olmo_hybrid.cli import main as cli_main
from olmo_hybrid.errors import CheckpointError, ConfigError, DataError
from olmo_hybrid.longctx import extend, plan_extension, read_extend_record
from olmo_hybrid.train.metrics import read_metrics

LONG = 4 * BASE_LEN
# The stage's long-context settings: packed documents with intra-document masking, every block checkpointed, the
# loss in chunks of 64 tokens; checkpoints every 2 steps.
STAGE = ["data.doc_masking=true", "trainer.activation_checkpointing=full", "trainer.loss_chunk_tokens=64",
         "trainer.save_interval=2", "trainer.eval_interval=0", "trainer.log_interval=1"]

KILL_SCRIPT = r"""
import os, signal, sys
from olmo_hybrid.train.trainer import Trainer
real_save = Trainer.save

def save_then_die(self):
    path = real_save(self)
    if self.step == 4:  # killed outright right after the step-4 checkpoint, as by the OOM killer or a pre-emption
        os.kill(os.getpid(), signal.SIGKILL)
    return path

Trainer.save = save_then_die
from olmo_hybrid.cli import main
sys.exit(main(sys.argv[1:]))
"""


def losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


def test_stage_config_follows_the_long_context_recipe(base_run, corpus):
    plan = plan_extension(base_run, "yarn", LONG, tokens=10_000,
                          overrides=["data.doc_masking=true", "trainer.activation_checkpointing=full",
                                     "trainer.loss_chunk_tokens=64", "optim.lr=1e-3", "parallel.cp_degree=2",
                                     "parallel.cp_mode=state_passing"])
    c = plan.config
    assert (c.data.seq_len, c.data.batch_size, c.trainer.steps) == (LONG, 2, 40)  # same tokens per step
    assert (c.schedule.name, c.schedule.final_lr_fraction, c.schedule.warmup_steps) == ("linear", 0.0, 2)
    assert (c.model.rope_type, c.model.rope_factor, c.model.rope_original_max_seq_len, c.model.max_seq_len) == \
        ("yarn", 4.0, BASE_LEN, LONG)
    assert c.data.doc_masking and c.trainer.activation_checkpointing == "full" and c.trainer.loss_chunk_tokens == 64
    assert c.optim.lr == 1e-3 and c.data.path == str(corpus)  # the source's recipe, then the overrides
    assert (c.parallel.cp_degree, c.parallel.cp_mode) == (2, "state_passing")  # passed through to the trainer
    recal = plan_extension(base_run, "drope", LONG, steps=5, recalibrate=True)
    assert (recal.train_len, recal.config.data.seq_len, recal.config.model.max_seq_len,
            recal.config.model.rope_theta) == (BASE_LEN, BASE_LEN, LONG, None)
    for kwargs, message in [(dict(method="yarn"), "give the stage's length once"),
                            (dict(method="yarn", steps=3, tokens=9), "give the stage's length once"),
                            (dict(method="yarn", steps=3, recalibrate=True), "needs --method drope"),
                            (dict(method="none", steps=3, train_len=2 * LONG), "exceeds --seq-len"),
                            (dict(method="none", steps=3, overrides=["data.seq_len=64"]), "--train-len"),
                            (dict(method="none", steps=3, overrides=["optim.nope=1"]), "unknown config field")]:
        with pytest.raises(ConfigError, match=message):
            plan_extension(base_run, seq_len=LONG, **kwargs)


def test_extend_refuses_bad_destinations_and_mismatched_data(base_run, tmp_path):
    with pytest.raises(ConfigError, match="is the source or inside it"):
        extend(base_run, base_run / "ext", "none", LONG, steps=1, log=quiet)
    with pytest.raises(CheckpointError, match="does not exist"):
        extend(tmp_path / "missing", tmp_path / "ext", "none", LONG, steps=1, log=quiet)
    from olmo_hybrid.data.corpus import Document, bundled_corpus
    from olmo_hybrid.data.prepare import prepare

    text = bundled_corpus()[5].text[:20_000]
    other = prepare(None, tmp_path / "other", documents=[Document(text[:15_000], "a"), Document(text[15_000:], "b")],
                    bpe_vocab=300, val_fraction=0.5, workers=1, progress=False)
    with pytest.raises(DataError, match="tokenized with"):  # another BPE: the ids would mean other tokens
        extend(base_run, tmp_path / "ext", "none", LONG, steps=1, overrides=[f"data.path={other}"], log=quiet)


@pytest.fixture(scope="module")
def straight(base_run, tmp_path_factory):
    """An uninterrupted 6-step YaRN stage from the base run to 4x its length."""
    out = tmp_path_factory.mktemp("straight") / "ext"
    result = extend(base_run, out, "yarn", LONG, steps=6, overrides=STAGE, log=quiet)
    return out, result


def test_killed_stage_resumes_exactly(base_run, straight, tmp_path):
    expected = losses(straight[0])
    assert len(expected) == 6
    out = tmp_path / "ext"
    cmd = [sys.executable, "-c", KILL_SCRIPT, "extend", str(base_run), "--method", "yarn", "--seq-len", str(LONG),
           "--steps", "6", "--out", str(out), *STAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert losses(out) == expected[:4] and not (out / "hf").exists()
    result = extend(base_run, out, "yarn", LONG, steps=6, overrides=STAGE, resume=True, log=quiet)
    assert result.losses == expected[4:]  # this invocation's steps, from the step-4 checkpoint
    assert losses(out) == expected  # bit for bit, as an uninterrupted stage
    assert read_extend_record(out)["method"] == "yarn"


def test_extended_run_loads_in_generate_eval_and_transformers(straight, tmp_path, capsys):
    out, result = straight
    assert result.steps == 6 and result.hf_dir == out / "hf"
    record = read_extend_record(out)
    assert (record["seq_len"], record["original_len"], record["tokens"]) == (LONG, BASE_LEN, 6 * LONG * 2)
    model, tok = load_model_and_tokenizer(out)
    assert (model.config.rope_type, model.config.rope_factor, model.config.max_seq_len) == ("yarn", 4.0, LONG)
    assert cli_main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "0"]) == 0
    text = tmp_path / "held_out.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 4)
    assert cli_main(["eval", str(out), "--suite", "bpb", "--out", str(tmp_path / "eval"), "--quiet",
                     "--text", str(text)]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["suites"]["bpb"]["bpb"] > 0
    transformers = pytest.importorskip("transformers")
    ref = transformers.OlmoHybridForCausalLM.from_pretrained(out / "hf").eval()
    x = torch.randint(0, model.config.vocab_size, (2, LONG))
    with torch.no_grad():
        want = ref(x).logits
        assert ((model(x) - want).abs().max() / want.abs().max()).item() < 1e-4
    capsys.readouterr()


class Preempted(Exception):
    pass


def test_drope_recalibration_resumes_exactly_and_loads_in_transformers(base_run, tmp_path, monkeypatch):
    from olmo_hybrid.train.trainer import Trainer

    stage = ["trainer.save_interval=2", "trainer.eval_interval=0", "trainer.log_interval=1"]
    run = dict(method="drope", seq_len=LONG, steps=4, recalibrate=True, overrides=stage, log=quiet)
    straight = extend(base_run, tmp_path / "straight", **run)
    assert len(straight.losses) == 4
    real_save = Trainer.save

    def save_then_fail(self):
        path = real_save(self)
        if self.step == 2:
            raise Preempted
        return path

    monkeypatch.setattr(Trainer, "save", save_then_fail)
    with pytest.raises(Preempted):
        extend(base_run, tmp_path / "ext", **run)
    monkeypatch.setattr(Trainer, "save", real_save)
    resumed = extend(base_run, tmp_path / "ext", resume=True, **run)
    assert resumed.losses == straight.losses[2:] and losses(tmp_path / "ext") == losses(tmp_path / "straight")
    record = read_extend_record(tmp_path / "ext")
    assert (record["train_len"], record["seq_len"], record["positions"]) == \
        (BASE_LEN, LONG, "NoPE (no positional encoding in attention)")
    model, _ = load_model_and_tokenizer(tmp_path / "ext")
    transformers = pytest.importorskip("transformers")
    ref = transformers.OlmoHybridForCausalLM.from_pretrained(tmp_path / "ext" / "hf").eval()
    assert ref.model.rotary_emb is None  # NoPE in transformers too
    x = torch.randint(0, model.config.vocab_size, (2, LONG))  # 4x the recalibration length
    with torch.no_grad():
        want = ref(x).logits
        assert ((model(x) - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.parametrize("args,message", [
    (["--method", "yarn", "--seq-len", "16"], "--seq-len 16 is shorter than the source's window of 32 tokens"),
    (["--method", "none", "--seq-len", "16"], "--seq-len 16 is shorter than the source's window of 32 tokens"),
    (["--method", "yarn", "--seq-len", "32"], r"must exceed the original length 32 \(YaRN factor = 32 / 32 = 1;"),
    (["--method", "yarn", "--seq-len", "128", "--original-len", "256"], r"YaRN factor = 128 / 256 = 0.5"),
    (["--method", "yarn", "--seq-len", "128", "model.rope_factor=2"],
     r"model.rope_factor=2.0 contradicts --method yarn \(which gives 4.0 for --seq-len 128 from the original length 32"),
    (["--method", "drope", "--seq-len", "128", "model.rope_theta=1e4"], "model.rope_theta=10000.0 contradicts --method drope"),
    (["--method", "drope", "--seq-len", "64", "--recalibrate", "--original-len", "128"],
     r"the original length 128 \(--recalibrate\) exceeds --seq-len 64"),
    (["--method", "yarn", "--seq-len", "128", "--original-len", "0"], "--original-len must be a positive number"),
    (["--method", "fancy", "--seq-len", "128"], "argument --method: invalid choice: 'fancy'"),
], ids=["shorter-yarn", "shorter-none", "yarn-factor-1", "yarn-factor-below-1", "factor-override",
        "drope-theta-override", "recalibrate-too-long", "zero-original-len",
        "unknown-method"])
def test_bad_extend_inputs_are_one_line_errors(base_run, tmp_path, capsys, args, message):
    out = tmp_path / "ext"
    assert cli_main(["extend", str(base_run), *args, "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("olmo-hybrid extend: error: ") and re.search(message, err), err
    assert not out.exists()


def test_extending_a_yarn_stage_again_rescales_from_its_original_length(straight):
    out, _ = straight  # YaRN factor 4 from 32 tokens, trained at 128
    further = plan_extension(out, "yarn", 2 * LONG, steps=1)
    assert (further.original_len, further.config.model.rope_factor,
            further.config.model.rope_original_max_seq_len) == (BASE_LEN, 8.0, BASE_LEN)
    recal = plan_extension(out, "drope", 2 * LONG, steps=1, recalibrate=True)
    assert recal.train_len == LONG and recal.config.model.rope_theta is None  # recalibrated at the length it trained at
    with pytest.raises(ConfigError, match="--original-len 64 contradicts the source's YaRN original length 32"):
        plan_extension(out, "yarn", 2 * LONG, steps=1, original_len=64)
