"""Context parallelism on CPU processes (torchrun, gloo) against one process: the loss and every parameter
gradient in both modes, with intra-document masking on and off (``cp_worker.py``, one launch for all scenarios);
the trainer under ``parallel.cp_degree=2`` against one process, its checkpoint resumed with CP=1 and a one-process
checkpoint resumed with CP=2; the bytes
each collective sends against their formulas; and the settings refused before training.

Tolerances: 1e-5 relative for losses and gradients (each parameter's largest gradient error over its largest
gradient; measured 6e-7 to 3e-6: fp32 with another summation order, and for state passing the states composed
through the [K, K] transitions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olmo_hybrid import checkpoint as ckpt
from olmo_hybrid.config import ConfigError, ModelConfig, to_dict
from olmo_hybrid.model import HybridLM
from olmo_hybrid.train.config import build_config
from olmo_hybrid.train.context_parallel import apply_context_parallel
from olmo_hybrid.train.cp_comm import CPGroup
from olmo_hybrid.train.metrics import read_metrics
from olmo_hybrid.train.parallel import mesh_shape
from olmo_hybrid.train.trainer import Trainer

from .conftest import make_config, quiet
from .cp_worker import MODEL, ODD_GDN_HEADS

RTOL = 1e-5
WORKER = Path(__file__).with_name("cp_worker.py")


def _torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _scenarios(nproc: int, *flags: str) -> list[dict]:
    proc = _torchrun(nproc, str(WORKER), *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _expected_bytes(r: dict) -> dict[str, int]:
    """What each rank sends per step, from the formulas in docs/training.md ("Context parallelism"), for the
    worker's model (1 attention and 2 GDN layers, fp32) and batch (2 rows of r["t"] tokens): forward and backward
    alike, except that the doc ids travel in forward only."""
    n, rows, f32 = r["cp"], 2 // (r["world"] // r["cp"]), 4
    tl = r["t"] // n
    m = ModelConfig(**{**MODEL, **(ODD_GDN_HEADS if r["gdn_heads"] == 3 else {})}).resolved()
    hk, hvv, hv = m.gdn_heads * m.gdn_head_k, m.gdn_v_heads * m.gdn_head_v, m.gdn_v_heads
    attention = (n - 1) / n * rows * tl * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) * f32
    halo = (n - 1) * rows * (m.gdn_conv_size - 1) * (2 * hk + hvv) * f32 * 2
    out = {"attention": attention, "conv_halo": halo}
    if r["mode"] == "ulysses":
        out["delta_rule"] = (n - 1) / n * rows * tl * (2 * hk + 2 * hvv + 2 * hv) * f32 * 2
    else:
        out["delta_rule_state"] = (n - 1) * rows * hv * m.gdn_head_k * (m.gdn_head_k + m.gdn_head_v) * f32 * 2
    sent = {f"{k}/{way}": int(v) for k, v in out.items() for way in ("forward", "backward")}
    if r["doc_masking"]:
        sent["doc_ids/forward"] = (n - 1) * rows * tl * 8
    return sent


def _check(results: list[dict], nproc: int) -> None:
    modes = {(m, d) for m in ("ulysses", "state_passing") for d in (True, False)}
    assert {(r["mode"], r["doc_masking"]) for r in results if r["kind"] == "batch"} == modes
    shapes = [r for r in results if r["kind"] == "shapes"]
    assert {(r["mode"], r["doc_masking"]) for r in shapes} == modes
    assert {(r["mode"], r["rope"]) for r in shapes} >= {(m, p) for m in ("ulysses", "state_passing")
                                                         for p in ("yarn", "none")}
    assert {r["conv"] for r in shapes} == {2, 4, 5} and {r["rows"] for r in shapes} == {3}
    for r in results:
        name = (f"{r['kind']}: {r['mode']}, doc masking {r['doc_masking']}, cp {r['cp']} of {r['world']}, ac {r['ac']}"
                f", rope {r['rope']}, conv {r['conv']}, {r['t']} tokens")
        assert r["world"] == nproc
        assert r["loss"] == pytest.approx(r["want_loss"], rel=RTOL), name
        assert r["grad_rel_err"] < RTOL, f"{name}: {r['worst']} {r['grad_rel_err']:.2e}"
        assert not r["zero_grads"], name  # every parameter has a real gradient
        if r["kind"] == "batch":
            assert r["params"] == 50, name
            if r["ac"] == "none":  # recomputation repeats the forward's collectives
                assert r["sent"] == _expected_bytes(r), name


def test_context_parallel_equals_one_process_two_ranks():
    """Both modes, masking on and off; state passing with 3 GDN heads (no degree divides them); and state
    passing under full activation checkpointing, which repeats the collectives in backward."""
    results = _scenarios(2)
    _check(results, 2)
    assert any(r["ac"] == "full" for r in results) and any(r["gdn_heads"] == 3 for r in results)


@pytest.mark.slow
def test_context_parallel_equals_one_process_four_ranks():
    """CP over 4 ranks (a document's state crosses three of them), and 2 data-parallel x 2 context-parallel."""
    results = _scenarios(4)
    _check(results, 4)
    assert {r["cp"] for r in results} == {2, 4}


@pytest.mark.slow
def test_compiled_blocks_with_context_parallelism_equal_one_process():
    """Every block compiled with fullgraph=True (a graph break would be an error), the collectives inside."""
    (r,) = _scenarios(2, "--compile")
    assert r["compiled"] and r["loss"] == pytest.approx(r["want_loss"], rel=RTOL)
    assert r["grad_rel_err"] < RTOL, f"{r['worst']} {r['grad_rel_err']:.2e}"


# -- the trainer ------------------------------------------------------------------------------------


def _config(corpus_dir, *overrides: str):
    return make_config(corpus_dir, "trainer.steps=6", "trainer.save_interval=3", "trainer.keep_last_k=0",
                       "data.batch_size=2", "data.doc_masking=true", *overrides)


def test_trainer_with_cp2_matches_one_process_and_resumes_with_cp1(corpus_dir, tmp_path):
    """``olmo-hybrid train`` under torchrun with parallel.cp_degree=2 (state passing, packed documents with
    intra-document masking): the same per-step losses, gradient norms and validation losses as one process
    (the validation tail padded to a whole sequence); its step-3 checkpoint resumed on one process without
    CP continues with the same next-step loss."""
    one = tmp_path / "one"
    Trainer(_config(corpus_dir), one, log=quiet).fit()
    single = read_metrics(one / "metrics.jsonl")

    cfg = _config(corpus_dir, "parallel.cp_degree=2", "parallel.cp_mode=state_passing", "trainer.export_hf=true")
    cfg_file = tmp_path / "cp2.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    run = tmp_path / "cp2"
    proc = _torchrun(2, "-m", "olmo_hybrid.train", str(cfg_file), "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "context parallel 2 (state_passing: each sequence split in 2 slices of 16 tokens)" in proc.stdout
    double = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in double] == list(range(1, 7))
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"]
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=RTOL)
    assert (run / "hf" / "config.json").is_file()

    for info in ckpt.list_checkpoints(run):
        if info.step > 3:
            shutil.rmtree(info.path)
    shutil.rmtree(run / "hf")
    logs = []
    result = Trainer(_config(corpus_dir), run, resume=True, log=logs.append).fit()
    assert any("resumed from" in line and "step 3" in line for line in logs)
    assert not any("data.batch_size" in line for line in logs)
    assert result.losses[0] == pytest.approx(double[3]["loss"], rel=1e-6)
    assert result.losses == pytest.approx([r["loss"] for r in double[3:]], rel=RTOL)


def test_a_checkpoint_without_cp_resumes_with_cp2_ulysses(corpus_dir, tmp_path):
    """The other direction and the other mode: a one-process run's step-3 checkpoint resumed by ``olmo-hybrid
    train`` under torchrun with parallel.cp_degree=2 in Ulysses mode continues with the one-process losses."""
    run = tmp_path / "run"
    single = Trainer(_config(corpus_dir), run, log=quiet).fit().losses
    for info in ckpt.list_checkpoints(run):
        if info.step > 3:
            shutil.rmtree(info.path)
    (run / "metrics.jsonl").unlink()
    cfg_file = tmp_path / "cp2.json"
    cfg_file.write_text(json.dumps(to_dict(_config(corpus_dir, "parallel.cp_degree=2", "parallel.cp_mode=ulysses"))))
    proc = _torchrun(2, "-m", "olmo_hybrid.train", str(cfg_file), "--out", str(run), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "context parallel 2 (ulysses" in proc.stdout
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert resumed[0]["loss"] == pytest.approx(single[3], rel=1e-6)
    assert [r["loss"] for r in resumed] == pytest.approx(single[3:], rel=RTOL)


# -- settings refused before training ---------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["parallel.cp_degree=3"], "parallel.cp_degree=3 must divide every head count in ulysses mode .* "
                               "model.n_heads=4, model.n_kv_heads=4, model.gdn_heads=4, model.gdn_v_heads=4 are "
                               r"not divisible \(attention layers use Ulysses in every mode\)$"),
    (["parallel.cp_degree=2", "model.gdn_heads=3"],  # only the GDN heads: state passing would run it
     r"model.gdn_heads=3, model.gdn_v_heads=3 are not divisible \(parallel.cp_mode=state_passing has no limit"),
    (["parallel.cp_degree=8", "parallel.cp_mode=state_passing"],
     "in state_passing mode .* model.n_heads=4, model.n_kv_heads=4 are not divisible .*Ulysses in every mode"),
    (["parallel.cp_degree=2", "data.seq_len=255"], "data.seq_len=255 is not divisible by parallel.cp_degree=2"),
    (["parallel.cp_degree=128", "parallel.cp_mode=state_passing", "model.layer_pattern=G"],
     r"256 / parallel.cp_degree=128 = 2 tokens per rank is shorter than .* \(model.gdn_conv_size - 1 = 3\)"),
    (["parallel.cp_mode=ring"], "parallel.cp_mode: expected one of ulysses, state_passing, got 'ring'"),
    (["parallel.cp_degree=0"], "parallel.cp_degree must be a positive integer, got 0"),
    (["parallel.cp_degree=2", "model.layer_pattern=MMMA", "model.mamba_head_dim=32"],
     r"parallel.cp_degree=2: context parallelism is not implemented for Mamba2 layers \(model.layer_pattern='MMMA'"),
])
def test_bad_settings_are_refused_with_the_fields_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, overrides)


def test_state_passing_lifts_the_gdn_head_limit():
    build_config(None, ["parallel.cp_degree=2", "parallel.cp_mode=state_passing", "model.gdn_heads=3"])
    with pytest.raises(ConfigError, match="model.gdn_heads=3"):
        build_config(None, ["parallel.cp_degree=2", "model.gdn_heads=3"])


def test_cp_degree_must_divide_the_world_size(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="parallel.cp_degree=4 does not divide the world size 6"):
        mesh_shape(6, 1, -1, 4)
    with pytest.raises(ConfigError, match="dp_replicate x parallel.dp_shard x parallel.cp_degree = 2 x 2 x 2 = 8"):
        mesh_shape(4, 2, 2, 2)
    assert mesh_shape(8, 2, -1, 2) == (2, 2, 2)
    # one process: refused before the data is opened or the model built
    with pytest.raises(ConfigError, match="parallel.cp_degree=2 does not divide the world size 1"):
        Trainer(_config(corpus_dir, "parallel.cp_degree=2"), tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()


def test_context_parallel_model_keeps_its_parameter_names_and_refuses_a_cache():
    torch.manual_seed(0)
    plain = HybridLM(ModelConfig(**MODEL))
    model = HybridLM(ModelConfig(**MODEL))
    apply_context_parallel(model, CPGroup(group=None, rank=0, degree=2), "state_passing")
    assert list(model.state_dict()) == list(plain.state_dict())
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="no cache, context or logits_to_keep"):
        model(ids, cache=plain.new_cache(1, 16).for_prefill(slice(0, 1), 0))
    with pytest.raises(ValueError, match="no cache, context or logits_to_keep"):
        model(ids, logits_to_keep=1)
