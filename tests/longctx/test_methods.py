"""DRoPE and YaRN as config changes of a trained model, and what each refuses."""

import dataclasses

import pytest
import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.errors import ConfigError
from olmo_hybrid.longctx import describe_positions, drop_rope, extended_config
from olmo_hybrid.model import HybridLM
from olmo_hybrid.model.rope import rope_parameters, yarn_attention_factor, yarn_mscale

BASE = dict(vocab_size=61, d_model=48, n_layers=4, layer_pattern="GAGA", n_heads=4, gdn_heads=2, gdn_head_k=12,
            gdn_head_v=24, mlp_hidden=96, max_seq_len=64)


def with_weights(config: ModelConfig, state: dict) -> HybridLM:
    model = HybridLM(config, init=False)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("positions", [{"rope_theta": 10_000.0},
                                       {"rope_theta": 500_000.0, "rope_type": "yarn", "rope_factor": 4.0,
                                        "rope_original_max_seq_len": 16, "rope_attention_factor": 1.2}],
                         ids=["rope", "yarn"])
def test_drope_model_equals_a_nope_model_built_with_the_same_weights(positions):
    torch.manual_seed(0)
    trained = HybridLM(ModelConfig(**BASE, **positions)).eval()
    state = trained.state_dict()
    dropped = with_weights(extended_config(trained.config, "drope", 256, 64), state)
    nope = with_weights(ModelConfig(**{**BASE, "max_seq_len": 256}), state)
    x = torch.randint(0, 61, (2, 200))
    with torch.no_grad():
        out = dropped(x)
        assert torch.equal(out, nope(x))
        assert not torch.allclose(out[:, :64], trained(x[:, :64]), atol=1e-3)  # RoPE did matter before the drop
    assert dropped.config.rope_theta is None and dropped.config.rope_factor is None
    assert drop_rope(trained.config) == dataclasses.replace(nope.config, max_seq_len=trained.config.max_seq_len)


def test_drope_model_decodes_as_the_nope_model():
    torch.manual_seed(0)
    trained = HybridLM(ModelConfig(**BASE, rope_theta=10_000.0)).eval()
    models = [with_weights(extended_config(trained.config, "drope", 256, 64), trained.state_dict()),
              with_weights(ModelConfig(**{**BASE, "max_seq_len": 256}), trained.state_dict())]
    prompt = torch.randint(0, 61, (2, 70))
    steps = torch.randint(0, 61, (2, 8))
    logits = []
    for model in models:
        cache = model.new_cache(2, 80)
        with torch.no_grad():
            out = [model(prompt, cache=cache.for_prefill(slice(0, 2), 0))[:, -1]]
            out += [model(steps[:, i:i + 1], cache=cache.for_decode(slice(0, 2)))[:, 0] for i in range(8)]
        logits.append(torch.stack(out))
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(models[0].generate(prompt, max_new_tokens=12), models[1].generate(prompt, max_new_tokens=12))


def test_extended_configs_and_their_refusals():
    rope = ModelConfig(**BASE, rope_theta=10_000.0)
    yarn = extended_config(rope, "yarn", 512, 64)
    assert (yarn.rope_type, yarn.rope_factor, yarn.rope_original_max_seq_len, yarn.rope_beta_fast,
            yarn.rope_beta_slow, yarn.max_seq_len) == ("yarn", 8.0, 64, 32.0, 1.0, 512)
    again = extended_config(yarn, "yarn", 1024, yarn.rope_original_max_seq_len)  # a YaRN model extended further
    assert (again.rope_factor, again.rope_original_max_seq_len) == (16.0, 64)
    assert extended_config(rope, "none", 512, 64) == dataclasses.replace(rope, max_seq_len=512)
    nope = ModelConfig(**BASE)
    for method, message in (("drope", "no RoPE to drop"), ("yarn", "nothing to rescale"), ("fancy", "unknown")):
        with pytest.raises(ConfigError, match=message):
            extended_config(nope, method, 512, 64)
    for config, method, seq_len, original, message in [
            (rope, "none", 32, 64, "shorter than the source's window of 64"),
            (yarn, "yarn", 256, 64, "shorter than the source's window of 512"),
            (rope, "yarn", 64, 64, r"must exceed the original length 64 \(YaRN factor = 64 / 64 = 1;"),
            (rope, "yarn", 128, 256, r"YaRN factor = 128 / 256 = 0.5"),
            (yarn, "yarn", 1024, 128, "contradicts the source's YaRN original length 64"),
            (rope, "drope", 512, 0, "lengths must be positive")]:
        with pytest.raises(ConfigError, match=message):
            extended_config(config, method, seq_len, original)


def test_a_yarn_source_is_rescaled_from_its_original_length_not_stacked():
    deepseek = ModelConfig(**BASE, rope_theta=10_000.0, rope_type="yarn", rope_factor=4.0, rope_original_max_seq_len=16,
                           rope_beta_fast=16.0, rope_beta_slow=2.0, rope_mscale=0.707, rope_mscale_all_dim=1.0,
                           rope_truncate=False)
    longer = extended_config(deepseek, "yarn", 256, 16)
    assert longer == dataclasses.replace(deepseek, rope_factor=16.0, max_seq_len=256)  # the ramp's shape is kept
    assert yarn_attention_factor(longer) == yarn_mscale(16.0, 0.707) / yarn_mscale(16.0, 1.0)
    # an explicit attention factor belonged to the old factor: the new one is derived from the new factor
    explicit = dataclasses.replace(deepseek, rope_mscale=None, rope_mscale_all_dim=None, rope_attention_factor=1.7)
    longer = extended_config(explicit, "yarn", 256, 16)
    assert longer.rope_attention_factor is None and yarn_attention_factor(longer) == yarn_mscale(16.0)
    assert "attention factor 1.277" in describe_positions(longer)
    # a model stretched 4x and then 16x from 16 tokens has the positions of a model stretched 16x at once
    plain = ModelConfig(**{**BASE, "max_seq_len": 16}, rope_theta=10_000.0)
    at_once = extended_config(plain, "yarn", 256, 16)
    twice = extended_config(extended_config(plain, "yarn", 64, 16), "yarn", 256, 16)
    assert twice == at_once and torch.equal(rope_parameters(twice)[0], rope_parameters(at_once)[0])
