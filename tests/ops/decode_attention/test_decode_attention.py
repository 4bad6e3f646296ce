"""Decode attention (one query per row over that row's first ``lengths[b]`` keys): the torch reference and the
split-KV Triton kernel (interpreter on CPU) against a float64 loop of exact-length SDPA calls."""

import pytest
import torch

from olmo_hybrid import ops

da = pytest.importorskip("olmo_hybrid.ops.decode_attention.kernel")


def loop_reference(q, keys, values, lengths, scale=None):
    """float64 SDPA of row b's query over its first lengths[b] keys (kv heads repeated for grouped queries)."""
    rep = q.shape[1] // keys.shape[1]
    out = []
    for b, n in enumerate(lengths.tolist()):
        k = keys[b:b + 1, :, :n].double().repeat_interleave(rep, dim=1)
        v = values[b:b + 1, :, :n].double().repeat_interleave(rep, dim=1)
        out.append(torch.nn.functional.scaled_dot_product_attention(q[b:b + 1].double(), k, v, scale=scale))
    return torch.cat(out)


def random_case(batch, heads, kv_heads, capacity, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, heads, dim, generator=gen).to(dtype).transpose(1, 2)  # the model's strided q
    # Rows of a larger pool, as the engine passes them: row strides span the whole capacity.
    pool = torch.randn(2, batch + 1, kv_heads, capacity, dim, generator=gen).to(dtype) * 2
    lengths = torch.randint(1, capacity + 1, (batch,), generator=gen)
    lengths[0], lengths[-1] = capacity, 1  # a full row and a single-key row
    return q, pool[0, :batch], pool[1, :batch], lengths


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_torch_reference_matches_loop(dtype, tol):
    q, keys, values, lengths = random_case(3, 4, 2, 50, 16, dtype, seed=1)
    out = ops.decode_attention(q, keys, values, lengths, scale=0.3, backend="torch")
    ref = loop_reference(q, keys, values, lengths, scale=0.3)
    assert out.dtype == dtype and out.shape == (3, 4, 1, 16)
    assert float((out.double() - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("batch,heads,kv_heads,capacity,dim,dtype,sms,tol", [
    (3, 4, 4, 300, 32, torch.float32, 4, 1e-5),  # few splits
    (2, 4, 2, 1000, 24, torch.float32, 64, 1e-5),  # grouped kv heads, head dim not a power of two, many splits
    (2, 2, 2, 700, 64, torch.bfloat16, 64, 1e-2),  # bf16 cache: the output is rounded to bf16
])
def test_triton_kernel_matches_loop(monkeypatch, batch, heads, kv_heads, capacity, dim, dtype, sms, tol):
    monkeypatch.setattr(da, "_num_sms", lambda device: sms)
    q, keys, values, lengths = random_case(batch, heads, kv_heads, capacity, dim, dtype, seed=batch * capacity)
    split, n_splits = da.plan_splits(batch, heads, capacity, sms, 64)
    assert split % 64 == 0 and (n_splits - 1) * split < capacity <= n_splits * split
    out = ops.decode_attention(q, keys, values, lengths, backend="triton")
    ref = loop_reference(q, keys, values, lengths)
    assert out.dtype == dtype and out.shape == (batch, heads, 1, dim)
    assert torch.isfinite(out).all()
    assert float((out.double() - ref).norm() / ref.norm()) < tol


def test_decode_attention_rejects_bad_arguments():
    q = torch.randn(2, 4, 1, 8)
    keys = torch.randn(2, 3, 16, 8)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        ops.decode_attention(q, keys, keys, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="lengths must be an integer tensor"):
        ops.decode_attention(q, keys[:, :2], keys[:, :2], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="values must have shape"):
        ops.decode_attention(q, keys[:, :2], keys[:, :1], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, 1, D\]"):
        ops.decode_attention(torch.randn(2, 4, 2, 8), keys[:, :2], keys[:, :2], torch.tensor([1, 2]))
