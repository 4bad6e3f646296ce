"""The fast paths of training, each tied to the plain path on fresh random inputs (fp32, CPU):
chunked cross-entropy + z-loss, activation checkpointing, per-block torch.compile; and the mesh checks."""

from __future__ import annotations

import copy

import pytest
import torch

from olmo_hybrid.config import ConfigError, ModelConfig
from olmo_hybrid.distributed import DistEnv
from olmo_hybrid.model import HybridLM
from olmo_hybrid.train.loss import chunked_lm_loss, loss_terms
from olmo_hybrid.train.parallel import apply_activation_checkpointing, apply_compile, build_mesh, checkpointed_layers

from .conftest import TINY_MODEL

Z = 1e-2  # a large z-loss weight, so its gradient term is visible in the comparison


def _model(seed=0) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(ModelConfig(**{**TINY_MODEL, "n_layers": 4, "layer_pattern": "GGGA"}))


def _batch(seed=1, b=2, t=24):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY_MODEL["vocab_size"], (b, t), generator=gen)
    labels = torch.randint(0, TINY_MODEL["vocab_size"], (b, t), generator=gen)
    labels[0, :3] = -100  # unscored tokens must not count
    return ids, labels


def _plain_loss(model, ids, labels):
    ce, z, n = loss_terms(model(ids), labels)
    return (ce + Z * z) / n, ce


def _grads(model) -> dict[str, torch.Tensor]:
    # named_parameters() shows the checkpoint wrapper's level; state_dict() (what checkpoints use) does not
    return {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_grads(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_chunked_loss_matches_full_logits_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 37, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(50, 16, generator=gen) * 0.5).requires_grad_()
    labels = torch.randint(0, 50, (3, 37), generator=gen)
    labels[1, 5:9] = -100
    ce, z, n = loss_terms(hidden @ weight.t(), labels)
    ((ce + Z * z) / n * 3.0).backward()  # an upstream gradient other than 1
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss, ce_c, z_c = chunked_lm_loss(hidden, weight, labels, Z, 1.0 / n.item(), chunk_tokens=16)  # 111 = 6x16 + 15
    (loss * 3.0).backward()
    torch.testing.assert_close(loss, (ce + Z * z) / n, rtol=1e-6, atol=0)
    torch.testing.assert_close(ce_c, ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(z_c, z, rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden.grad, want_h, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(weight.grad, want_w, rtol=1e-5, atol=1e-8)
    assert not ce_c.requires_grad and not z_c.requires_grad


def test_chunked_loss_through_the_model_matches_the_plain_path():
    model = _model()
    ids, labels = _batch()
    loss, ce = _plain_loss(model, ids, labels)
    loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    n = (labels != -100).sum().item()
    head = lambda h, lm_head: chunked_lm_loss(h, lm_head.weight, labels, Z, 1.0 / n, chunk_tokens=10)
    loss_c, ce_c, _ = model(ids, lm_head_fn=head)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(ce_c, ce.detach(), rtol=1e-6, atol=0)
    _assert_same_grads(_grads(model), want, rtol=1e-5, atol=1e-7)


def test_chunked_loss_under_bf16_autocast_stays_close_to_fp32():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 32, generator=gen)
    weight = torch.randn(300, 32, generator=gen) * 0.2
    labels = torch.randint(0, 300, (64,), generator=gen)
    ce, z, n = loss_terms(hidden @ weight.t(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = chunked_lm_loss(hidden, weight, labels, Z, 1.0 / n.item(), chunk_tokens=24)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, (ce + Z * z) / n, rtol=2e-2, atol=0)  # bf16 matmul inputs, fp32 softmax


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode):
    plain, wrapped = _model(), _model()
    chosen = apply_activation_checkpointing(wrapped, mode, every=2)
    assert chosen == ([0, 2] if mode == "selective" else [0, 1, 2, 3])
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints stay interchangeable
    ids, labels = _batch()
    for m in (plain, wrapped):
        _plain_loss(m, ids, labels)[0].backward()
    _assert_same_grads(_grads(wrapped), _grads(plain), rtol=0, atol=0)  # the same ops recomputed: bit-exact


def test_checkpointed_layer_choice():
    assert checkpointed_layers(5, "none", 2) == []
    assert checkpointed_layers(5, "selective", 3) == [0, 3]
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        checkpointed_layers(5, "some", 2)


def test_compiled_blocks_match_eager_without_graph_breaks():
    """fullgraph=True makes any graph break an error. The CPU test uses inductor's own decompositions and
    joint-graph partitioner without its code generation (minutes on 2 cores); the GPU run compiles fully."""
    plain = _model()
    compiled = copy.deepcopy(plain)
    apply_activation_checkpointing(compiled, "selective", every=2)
    apply_compile(compiled, backend="aot_eager_decomp_partition")
    ids, labels = _batch()
    losses = [_plain_loss(m, ids, labels)[0] for m in (plain, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    _assert_same_grads(_grads(compiled), _grads(plain), rtol=1e-5, atol=1e-7)
    assert list(compiled.state_dict()) == list(plain.state_dict())


def test_mesh_shape_must_cover_the_world():
    env = DistEnv(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="3 x 2 = 6, but torchrun started 4 processes"):
        build_mesh(env, 3, 2)
    with pytest.raises(ConfigError, match="dp_replicate=3 does not divide the world size 4"):
        build_mesh(env, 3, -1)
