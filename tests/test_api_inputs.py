"""The documented Python API with bad inputs: a clear error naming the field, tensor or argument, never a raw
traceback from deep inside torch, numpy or safetensors, and never a silently different model.

Every case here was a wrong result or an unclear error once (the bad-input sweep in docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from olmo_hybrid.checkpoint import load_model_and_tokenizer
from olmo_hybrid.config import ModelConfig, model_preset
from olmo_hybrid.errors import ConfigError
from olmo_hybrid.model import HybridLM
from olmo_hybrid.model.sampling import SamplingParams

TINY = dict(vocab_size=64, d_model=32, n_layers=2, layer_pattern="GA", n_heads=2, gdn_heads=2, gdn_head_k=8,
            gdn_head_v=16, mlp_hidden=64, max_seq_len=64)

# (ModelConfig fields over TINY, the phrase of the ConfigError): each was accepted before, building another model
# (0 KV heads read as "as many as the query heads", "false" as true) or failing later inside torch.
BAD_MODEL_FIELDS = [
    ({"n_kv_heads": 0}, "model.n_kv_heads: must be a positive integer or null"),
    ({"gdn_v_heads": 0}, "model.gdn_v_heads: must be a positive integer or null"),
    ({"init_std": -1.0}, "model.init_std: must be >= 0"),
    ({"init_std": float("nan")}, "model.init_std: expected a finite number, got nan"),
    ({"norm_eps": float("inf")}, "model.norm_eps: expected a finite number, got inf"),
    ({"rope_theta": float("inf")}, "model.rope_theta: expected a finite number or null, got inf"),
    ({"rope_theta": "1e4"}, "model.rope_theta: expected a finite number or null, got '1e4'"),
    ({"rope_theta": 1e4, "rope_type": "linear"}, "model.rope_type: 'linear' is not implemented"),
    ({"tie_embeddings": "false"}, "model.tie_embeddings: expected true or false, got 'false'"),
    ({"gdn_allow_neg_eigval": "false"}, "model.gdn_allow_neg_eigval: expected true or false"),
    ({"layer_pattern": ["G", "A"]}, "model.layer_pattern: must be a non-empty string"),
]


@pytest.mark.parametrize("fields, phrase", BAD_MODEL_FIELDS)
def test_model_config_refuses_bad_values_by_field(fields, phrase):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**TINY, **fields})
    assert phrase in str(e.value)


def test_train_config_and_presets_name_what_is_wrong():
    from olmo_hybrid.train.config import OptimConfig, TrainConfig, TrainerConfig

    with pytest.raises(ConfigError, match=r"optim\.betas: expected a list of finite numbers, got \(0\.9, nan\)"):
        TrainConfig(optim=OptimConfig(betas=(0.9, float("nan"))))
    with pytest.raises(ConfigError, match=r"trainer\.seed must be in \[0, 2\*\*32\), got -1"):
        TrainConfig(trainer=TrainerConfig(seed=-1))
    with pytest.raises(ConfigError, match="unknown model field"):
        model_preset("tiny", nosuch=1)
    with pytest.raises(TypeError, match="HybridLM takes a ModelConfig"):
        HybridLM({"d_model": 32})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("api") / "hf"
    HybridLM(ModelConfig(**TINY)).save_pretrained(path)
    return path


def _damaged(checkpoint, tmp_path, change) -> str:
    copy = tmp_path / "damaged"
    shutil.copytree(checkpoint, copy)
    weights = load_file(copy / "model.safetensors")
    change(weights)
    save_file(weights, copy / "model.safetensors")
    return str(copy)


def _nan_head(weights):
    weights["lm_head.weight"][1, 2] = float("nan")


def _int_head(weights):
    weights["lm_head.weight"] = weights["lm_head.weight"].to(torch.int32)


@pytest.mark.parametrize("change, phrase", [
    (_nan_head, "tensor 'lm_head.weight' holds non-finite values"),
    (_int_head, "tensor 'lm_head.weight' is stored as torch.int32, expected a floating-point dtype"),
])
def test_weights_that_would_give_another_model_are_refused_by_tensor(checkpoint, tmp_path, change, phrase):
    path = _damaged(checkpoint, tmp_path, change)
    with pytest.raises(ValueError, match=phrase):
        HybridLM.from_pretrained(path)


def test_loading_arguments_are_checked(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype.*got 'bf16'"):
        HybridLM.from_pretrained(checkpoint, dtype="bf16")
    with pytest.raises(ValueError, match="got torch.int64"):
        HybridLM.from_pretrained(checkpoint, dtype=torch.int64)
    with pytest.raises(FileNotFoundError, match="config.json is a file"):
        HybridLM.from_pretrained(checkpoint / "config.json")
    with pytest.raises(ConfigError, match="device: "):
        load_model_and_tokenizer(checkpoint, device="bogus", require_tokenizer=False)
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="MPS .* is not available"):
            load_model_and_tokenizer(checkpoint, device="mps", require_tokenizer=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}, "trainer": {}}))
    with pytest.raises(ConfigError, match="is a training run's config.*load_model_and_tokenizer"):
        HybridLM.from_pretrained(run)


def test_generate_arguments_are_checked(checkpoint):
    model = HybridLM.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match=r"input_ids must be .* tensor, got list \(torch.tensor\(\[ids\]\) makes one\)"):
        model.generate([1, 2, 3], max_new_tokens=2)
    for seed in (-1, 2**63):
        with pytest.raises(ValueError, match=r"SamplingParams.seed must be an integer in \[0, 2\*\*63\)"):
            SamplingParams(seed=seed)
    SamplingParams(seed=2**63 - 1)  # the largest seed still works


def test_exports_and_datasets_get_the_users_permissions(checkpoint, tmp_path):
    """A directory built beside its destination and renamed into place is not left private (mkdtemp's 0700), nor
    are safetensors files (the library writes 0600): the user's group can read an export or a dataset."""
    from olmo_hybrid.checkpoint import convert_checkpoint

    old = os.umask(0o022)
    try:
        convert_checkpoint(checkpoint, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o644
