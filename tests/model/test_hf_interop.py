"""Our HybridLM against transformers' OlmoHybridForCausalLM on random weights, fp32 CPU, both directions."""

import json

import pytest
import torch

from olmo_hybrid.config import model_preset
from olmo_hybrid.model import HybridLM

transformers = pytest.importorskip("transformers")
from transformers import OlmoHybridConfig, OlmoHybridForCausalLM  # noqa: E402

VOCAB = 97


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def randomize(model, seed):
    """Random weights everywhere (norm weights around 1), leaving the gate parameters' own init."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("A_log", "dt_bias")):
            continue
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else 0.25 * noise)


def tf_model(path, config: dict, seed=1, **tf_overrides):
    """transformers' model from a config.json exactly as written (so its own defaults and legacy handling apply),
    with random weights saved in ``path``; the config.json stays as written, for our loader. ``tf_overrides`` are
    set on transformers' config after its validation (a layer pattern it refuses): its save_pretrained would
    refuse that config, so the state dict is written as it is in memory (fused conv)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tf_cfg = OlmoHybridConfig.from_pretrained(path)
    for key, value in tf_overrides.items():
        setattr(tf_cfg, key, value)
    torch.manual_seed(0)
    ref = OlmoHybridForCausalLM(tf_cfg).eval()
    randomize(ref, seed)
    if tf_overrides:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in ref.state_dict().items()}, str(path / "model.safetensors"))
    else:
        ref.save_pretrained(path)
        (path / "config.json").write_text(json.dumps(config))
    return ref


def tf_config(theta):
    return OlmoHybridConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
        linear_num_key_heads=4, linear_key_head_dim=16, linear_value_head_dim=32, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, rope_parameters={"rope_theta": theta, "rope_type": "default"})


@pytest.mark.parametrize("theta", [None, 500_000.0], ids=["nope", "rope"])
def test_import_from_transformers(tmp_path, theta):
    torch.manual_seed(0)
    ref = OlmoHybridForCausalLM(tf_config(theta)).eval()
    randomize(ref, 1)
    ref.save_pretrained(tmp_path)
    ours = HybridLM.from_pretrained(tmp_path).eval()
    assert ours.config.rope_theta == theta
    x = torch.randint(0, VOCAB, (2, 300))  # 4 full chunks of 64 and a ragged tail
    with torch.no_grad():
        assert rel_err(ours(x), ref(x).logits) < 1e-4


@pytest.mark.parametrize("theta", [None, 500_000.0], ids=["nope", "rope"])
def test_export_to_transformers(tmp_path, theta):
    cfg = model_preset("tiny", vocab_size=VOCAB, d_model=96, n_layers=4, n_heads=4, gdn_heads=4, gdn_head_k=16,
                       gdn_head_v=32, mlp_hidden=160, rope_theta=theta, max_seq_len=512)
    ours = HybridLM(cfg).eval()
    randomize(ours, 2)
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_parameters"]["rope_theta"] == theta  # null must be explicit, not TF's default
    ref = OlmoHybridForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, VOCAB, (2, 300))
    with torch.no_grad():
        assert rel_err(ours(x), ref(x).logits) < 1e-4


def test_seven_b_names_and_shapes_match_transformers():
    """Every tensor of the released architecture, by name and shape, on the meta device."""
    cfg = model_preset("olmo-hybrid-7b")
    with torch.device("meta"):
        ours = HybridLM(cfg, init=False)
        ref = OlmoHybridForCausalLM(OlmoHybridConfig())
    from olmo_hybrid.model.hf_io import canonical_state_dict

    ref_shapes = {n: tuple(t.shape) for n, t in canonical_state_dict(dict(ref.state_dict()), cfg).items()}
    our_shapes = {n: tuple(t.shape) for n, t in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert len(our_shapes) == 523
