"""KernelSettings: defaults equal to the kernels' historical launch choices, validation, and the path from the
public op's ``settings=`` through the custom ops (real and fake) into the kernels."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, tests/conftest.py has asked for its interpreter

from olmo_hybrid import ops  # noqa: E402
from olmo_hybrid.ops import KernelSettings  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS_SRC = Path(ops.__file__).parent


def test_defaults_give_the_established_launch_configuration():
    from olmo_hybrid.ops.gated_delta_rule.chunk_common import kernel_config

    s = KernelSettings()
    assert (s.dot, s.dot_backward, s.warps, s.stages, s.backward_warps, s.backward_stages) == ("bf16", "bf16", 4, 1,
                                                                                              4, 1)
    seq, bwd = dict(num_warps=4, num_stages=1), dict(num_warps=4, num_stages=1)
    assert kernel_config(128, 128, "bf16", s) == dict(BK=128, BV_seq=64, BV_bwd=64, seq=seq, bwd=bwd,
                                                      prep=dict(num_warps=4, num_stages=1))
    tf32 = kernel_config(96, 192, "tf32", s)
    assert (tf32["BK"], tf32["BV_seq"], tf32["BV_bwd"]) == (128, 32, 16)
    assert kernel_config(16, 16, "ieee", s)["BV_seq"] == 16  # clamped to the next power of two of V (at least 16)
    assert kernel_config(256, 64, "tf32", s)["BV_seq"] == 16
    tuned = kernel_config(128, 128, "bf16", KernelSettings(block_v=128, warps=8, backward_block_v=32, stages=2))
    assert (tuned["BV_seq"], tuned["BV_bwd"], tuned["seq"]) == (128, 32, dict(num_warps=8, num_stages=2))


def test_settings_are_frozen_hashable_and_validated():
    s = KernelSettings(dot="tf32", backward_dot="bf16")
    assert s.dot_backward == "bf16" and hash(s) == hash(KernelSettings(dot="tf32", backward_dot="bf16"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.dot = "bf16"
    with pytest.raises(ValueError, match=r"KernelSettings.dot='fp8': expected one of bf16, tf32, tf32r"):
        KernelSettings(dot="fp8")
    with pytest.raises(ValueError, match="KernelSettings.backward_block_v=48: expected a power of two"):
        KernelSettings(backward_block_v=48)
    with pytest.raises(ValueError, match="KernelSettings.stages=0"):
        KernelSettings(stages=0)


def test_custom_ops_take_the_settings_fields_in_order():
    from olmo_hybrid.ops.gated_delta_rule.custom_ops import settings_args

    names = [f.name for f in dataclasses.fields(KernelSettings)]
    tuned = KernelSettings(dot="tf32r", backward_dot="tf32", block_v=16, warps=2, stages=3, backward_block_v=32,
                           backward_warps=8, backward_stages=2)
    assert KernelSettings(*settings_args(tuned)) == tuned
    for op in (torch.ops.olmo_hybrid.gdr_chunk_fwd.default, torch.ops.olmo_hybrid.gdr_chunk_bwd.default):
        assert [a.name for a in op._schema.arguments][-len(names):] == names


def test_no_kernel_reads_the_environment():
    readers = [p.relative_to(OPS_SRC).as_posix() for p in OPS_SRC.rglob("*.py")
               if any(word in p.read_text() for word in ("os.environ", "getenv", "OLMO_HYBRID_GDN"))]
    assert readers == ["triton_runtime.py"]  # TRITON_INTERPRET only: whether Triton runs interpreted


def test_dot_settings_reach_forward_and_backward_kernels_and_fake_shapes():
    """bf16 inputs: the forward's dot setting changes the output and the dtype of the saved operand buffers (the
    fake implementation agrees); the backward's setting changes the gradients but not the forward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from olmo_hybrid.ops.gated_delta_rule.custom_ops import settings_args

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 20, 1, 16, generator=gen) for _ in range(3)]
    xs += [-torch.rand(1, 20, 1, generator=gen), torch.rand(1, 20, 1, generator=gen)]
    xs = [t.bfloat16().to(DEVICE) for t in xs]
    outputs = {}
    for dot in ("bf16", "tf32"):
        args = (*xs, 0.25, None, None, None, True, True, *settings_args(KernelSettings(dot=dot)))
        real = torch.ops.olmo_hybrid.gdr_chunk_fwd(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = torch.ops.olmo_hybrid.gdr_chunk_fwd(*(mode.from_tensor(a) if torch.is_tensor(a) else a
                                                         for a in args))
        assert [(r.dtype, r.shape) for r in real] == [(f.dtype, f.shape) for f in fake]
        assert real[4].dtype == (torch.float32 if dot == "tf32" else torch.bfloat16)
        outputs[dot] = real[0]
    assert not torch.equal(outputs["bf16"], outputs["tf32"])
    grads = {}
    for name, s in {"bf16": KernelSettings(), "bwd_tf32": KernelSettings(backward_dot="tf32")}.items():
        leaves = [t.clone().requires_grad_() for t in xs]
        o, _ = ops.gated_delta_rule(*leaves, use_qk_l2norm_in_kernel=True, settings=s, backend="triton", scale=0.25)
        assert torch.equal(o, outputs["bf16"])
        o.float().square().sum().backward()
        grads[name] = [t.grad for t in leaves]
    assert not torch.equal(grads["bf16"][0], grads["bwd_tf32"][0])


def test_gated_delta_rule_refuses_a_settings_dict():
    x = torch.randn(1, 2, 1, 4)
    with pytest.raises(TypeError, match="settings must be an olmo_hybrid.ops.KernelSettings or None, got dict"):
        ops.gated_delta_rule(x, x, x, -torch.rand(1, 2, 1), torch.rand(1, 2, 1), settings={"dot": "tf32"})


def test_step_ops_have_the_contracted_signatures():
    """The decode-step signatures other packages code against (the redesign contract)."""
    def params(fn):
        return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]

    pos, kw, empty = "POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY", inspect.Parameter.empty
    assert params(ops.gated_delta_rule_step) == [
        ("q", pos, empty), ("k", pos, empty), ("v", pos, empty), ("g", pos, empty), ("beta", pos, empty),
        ("state", pos, empty), ("scale", pos, None), ("use_qk_l2norm_in_kernel", pos, False), ("inplace", kw, False),
        ("active", kw, None), ("settings", kw, None), ("backend", kw, None)]
    assert params(ops.causal_conv1d_step) == [
        ("x", pos, empty), ("conv_state", pos, empty), ("weight", pos, empty), ("activation", pos, "silu"),
        ("inplace", kw, False), ("active", kw, None), ("backend", kw, None)]
