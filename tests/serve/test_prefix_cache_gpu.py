"""Prefix cache on the GPU (bf16, CUDA graphs): the same tokens up to near-ties, and a 3x lower time to first token
for a shared 4k-token prefix."""

import statistics

import pytest
import torch
from serve_util import random_prompts, tiny_model

from olmo_hybrid.model.prefix_cache import prefix_block_bytes
from olmo_hybrid.serve import Engine
from olmo_hybrid.serve.verify import greedy_disagreements

pytestmark = pytest.mark.gpu


def cache_bytes(model, blocks, block, dtype=torch.bfloat16):
    probe = Engine(model, max_batch=1, max_context=8, device="cuda", dtype=dtype)
    return blocks * prefix_block_bytes(probe.cache, block)


def test_prefix_cache_bf16_gives_the_same_tokens_up_to_near_ties():
    model = tiny_model("GGGA", d_model=128, n_heads=4, gdn_heads=4, gdn_head_k=32, gdn_head_v=64, mlp_hidden=256,
                       max_seq_len=600).to("cuda", torch.bfloat16)
    shared = random_prompts((300,), seed=5)[0].cuda()
    prompts = [torch.cat([shared, q.cuda()]) for q in random_prompts((1, 17, 64, 130), seed=6)]
    cached = Engine(model, max_batch=4, max_context=500, prefill_chunk=128, cuda_graphs=True,
                    prefix_cache_bytes=cache_bytes(model, 32, 64), prefix_block=64)
    first = [cached.generate([p], 32)[0] for p in prompts]  # the first prefills the shared blocks, the rest hit
    again = [cached.generate([p], 32)[0] for p in prompts]  # every prompt hits its own blocks now, same batching
    assert [o.cached_tokens for o in first[1:]] == [256, 256, 256]
    # A hit restores exactly what the same prefill pieces computed: the same tokens, not just close ones.
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    found = [d for p, o in zip(prompts, again) for d in greedy_disagreements(model, p, o.token_ids)]
    assert len(found) <= 0.05 * 4 * 32, found
    assert all(d.gap < 0.05 * d.spread for d in found), found  # bf16 near-ties between flat random logits only


@pytest.mark.timing
@pytest.mark.xfail(strict=True, reason=(
    "issue 19's open target: measured 1.86x on one H100 alone (2026-12-08: 30.3 ms without the cache, 16.3 ms "
    "with it). This 8-layer model's prefill is bound by the host (about 2,200 aten calls per eager forward, 14 ms "
    "for 64 tokens or 4,096), so a hit still pays one eager forward; passing needs a prefill with less host work "
    "(compiled or graphed), not a faster cache"))
def test_shared_4k_prefix_cuts_time_to_first_token_at_least_3x():
    from olmo_hybrid.config import ModelConfig
    from olmo_hybrid.model import HybridLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100352, d_model=1024, n_layers=8, n_heads=8, gdn_heads=8, gdn_head_k=96,
                      gdn_head_v=192, mlp_hidden=4096, rope_theta=500_000.0, layer_pattern="GGGA", max_seq_len=8192)
    model = HybridLM(cfg).to("cuda", torch.bfloat16).eval()
    system = torch.randint(1000, 90000, (4096,)).cuda()
    questions = [torch.randint(1000, 90000, (64,)).cuda() for _ in range(6)]
    ttft = {}
    for use_cache in (False, True):
        engine = Engine(model, max_batch=1, max_context=4096 + 64 + 8, cuda_graphs=True,
                        prefix_cache_bytes=cache_bytes(model, 20, 256) if use_cache else 0)
        engine.generate([torch.cat([system, questions[0]])], 2)  # warm-up (and, with the cache, the shared blocks)
        times = []
        for q in questions[1:]:
            out = engine.generate([torch.cat([system, q])], 2)[0]
            assert out.cached_tokens == (4096 if use_cache else 0)
            times.append(out.first_token_s)
        ttft[use_cache] = statistics.median(times)
    assert ttft[False] >= 3 * ttft[True], ttft
