"""The engine's CUDA decode path (``ops.decode_attention`` with per-row lengths on the device) run on the CPU:
the same logits as masked SDPA over ``span`` keys."""

import pytest
import torch
from serve_util import VOCAB, random_prompts, tiny_model

from olmo_hybrid import ops
from olmo_hybrid.serve.runner import ModelRunner
from olmo_hybrid.serve.slots import SlotCache

da = pytest.importorskip("olmo_hybrid.ops.decode_attention.kernel")


def test_runner_decode_with_the_kernel_equals_masked_sdpa(monkeypatch):
    # The engine's CUDA path on the CPU: per-row lengths, a free row inside the batch, grouped kv heads.
    monkeypatch.setattr(da, "_num_sms", lambda device: 16)
    model = tiny_model("GAGA", n_kv_heads=2)
    results = []
    for kernel in (None, ops.decode_attention):
        cache = SlotCache(model.config, 4, 64, dtype=torch.float32)
        runner = ModelRunner(model, cache)
        runner.decode_kernel = kernel
        assert [cache.allocate() for _ in range(4)] == [0, 1, 2, 3]
        cache.release(1)  # a free row inside the decode batch
        for slot, p in zip((0, 2, 3), random_prompts((5, 40, 17))):
            runner.prefill(slot, p, chunk=8)
        gen = torch.Generator().manual_seed(3)
        steps = []
        for _ in range(3):
            tokens = torch.randint(0, VOCAB, (4,), generator=gen)
            positions = torch.tensor([cache.lengths[s] for s in range(4)])
            steps.append(runner.decode(tokens, positions, span=int(positions.max()) + 1)[[0, 2, 3]])
            for s in (0, 2, 3):
                cache.lengths[s] += 1
        results.append(torch.stack(steps))
    assert (results[0] - results[1]).abs().max() < 1e-4 * results[0].abs().max()
