"""DRoPE and YaRN as config changes of a trained model, and what each refuses."""

import dataclasses

import pytest
import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.errors import ConfigError
from olmo_hybrid.longctx import drop_rope, extended_config
from olmo_hybrid.model import HybridLM

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
