"""Prefix state cache: restored rows equal prefilled ones, the same tokens with and without it, LRU under a budget."""

import random

import pytest
import torch
from serve_util import VOCAB, greedy_by_full_forwards, random_prompts, tiny_model

from olmo_hybrid.model.cache import layer_tensors
from olmo_hybrid.model.prefix_cache import PrefixCache, prefix_block_bytes
from olmo_hybrid.serve import Engine, SamplingParams

BLOCK = 8


def engine_with_cache(model, blocks=64, **kw):
    probe = Engine(model, max_batch=1, max_context=8)
    per_block = prefix_block_bytes(probe.cache, BLOCK)
    return Engine(model, prefix_cache_bytes=blocks * per_block, prefix_block=BLOCK, **kw)


def row(cache, slot, length):
    """Every state tensor of one slot: per-token fields up to ``length``, fixed-size states whole."""
    return [t[slot, :, :length] if name in s.per_token else t[slot]
            for s in cache.layers for name, t in layer_tensors(s)]


def test_restored_row_is_bit_identical_to_the_prefilled_one():
    model = tiny_model("GAGG", n_kv_heads=2)
    engine = engine_with_cache(model, max_batch=2, max_context=64)
    shared = random_prompts((27,))[0].tolist()
    engine.submit(shared + [5], 1)
    engine.step()  # prefilled into slot 0 (finished after one token; the blocks stay cached)
    assert engine.prefix_cache.used_blocks == 3
    node = engine.prefix_cache.lookup(shared + [9, 9, 9])
    assert node.end == 24 and [n.end for n in node.chain()] == [8, 16, 24]
    # Prefill the same 24 tokens into slot 1 directly, then restore into slot 0, and compare every tensor.
    ref = Engine(model, max_batch=2, max_context=64, prefill_chunk=BLOCK)
    slot = ref.cache.allocate()
    ref.cache.allocate()
    ids = torch.tensor(shared[:24])
    with torch.no_grad():
        for s in range(0, 24, BLOCK):
            model(ids[None, s:s + BLOCK], cache=ref.cache.for_prefill(slice(slot, slot + 1), s))
    engine.cache.allocate()
    assert engine.prefix_cache.restore(0, node) == 24 and int(engine.cache.lengths[0]) == 24
    for a, b in zip(row(engine.cache, 0, 24), row(ref.cache, slot, 24)):
        assert torch.equal(a, b)
    engine.prefix_cache.check()


@pytest.mark.parametrize("pattern", ["GGGA", "GAGA", "MMMA"])
def test_same_tokens_with_and_without_the_prefix_cache(pattern):
    # fp32 on the CPU: greedy and seeded sampling give the same tokens; a hit restores whole blocks only.
    model = tiny_model(pattern)
    system = random_prompts((29,), seed=7)[0].tolist()
    questions = [q.tolist() for q in random_prompts((1, 5, 11, 3, 16), seed=8)]
    prompts = [system + q for q in questions] + [system[:16], system[:17], system + questions[2]]
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=8, seed=3)] * 4
    plain = Engine(model, max_batch=2, max_context=64, prefill_chunk=16)
    cached = engine_with_cache(model, max_batch=2, max_context=64, prefill_chunk=16)
    for p, s in zip(prompts, params):
        want = plain.generate([p], 6, s)[0]
        got = cached.generate([p], 6, s)[0]
        assert got.token_ids == want.token_ids, p
        if s.greedy:
            assert got.token_ids == greedy_by_full_forwards(model, torch.tensor(p), 6)
    hits = [o.cached_tokens for o in (cached.generate([p], 1)[0] for p in prompts)]
    # Everything was prefilled once already: each prompt restores its longest whole-block prefix short of the end.
    assert hits == [(len(p) - 1) // BLOCK * BLOCK for p in prompts]
    stats = cached.prefix_cache.stats
    assert 0 < stats.hit_rate < 1 and stats.hit_tokens <= stats.queried_tokens
    cached.prefix_cache.check()


def test_hit_and_miss_give_bit_identical_logprobs():
    model = tiny_model("GGGA")
    prompt = random_prompts((40,), seed=3)[0].tolist()
    engine = engine_with_cache(model, max_batch=1, max_context=64, prefill_chunk=32)
    miss = engine.generate([prompt], 5, SamplingParams(temperature=1.0, seed=1))[0]
    rid = engine.submit(prompt, 5, SamplingParams(temperature=1.0, seed=1), logprobs=3)
    hit = next(engine.run_until_done())
    assert (miss.cached_tokens, hit.cached_tokens, hit.request_id) == (0, 32, rid)
    assert hit.token_ids == miss.token_ids
    fresh = Engine(model, max_batch=1, max_context=64, prefill_chunk=BLOCK)  # same pieces, no cache
    rid = fresh.submit(prompt, 5, SamplingParams(temperature=1.0, seed=1), logprobs=3)
    ref = next(fresh.run_until_done())
    assert [e.logprob for e in hit.logprobs] == [e.logprob for e in ref.logprobs]
    assert [e.top for e in hit.logprobs] == [e.top for e in ref.logprobs]


def test_lru_eviction_under_the_budget_keeps_chains_whole():
    rng = random.Random(0)
    model = tiny_model("GA")
    engine = engine_with_cache(model, blocks=6, max_batch=2, max_context=64)
    pc = engine.prefix_cache
    assert pc.num_blocks == 6
    stems = [random_prompts((24,), seed=s)[0].tolist() for s in range(4)]
    for i in range(40):
        stem = stems[rng.randrange(4)]
        engine.generate([stem[:rng.randint(9, 24)] + [rng.randrange(VOCAB)]], 1)
        pc.check()
        assert pc.used_blocks <= 6
    assert pc.stats.evicted_blocks > 0 and pc.stats.hit_tokens > 0
    # A popular stem keeps its root: after using stem 0 twice, its first block survives new traffic.
    engine.generate([stems[0] + [1]], 1)
    engine.generate([stems[1] + [1]], 1)
    assert pc.lookup(stems[0][:9]) is not None
    pc.clear()
    pc.check()
    assert pc.used_blocks == 0 and engine.cache.num_free == 2


def test_a_chain_whose_parent_was_evicted_stops_storing():
    model = tiny_model("GA")
    engine = engine_with_cache(model, blocks=2, max_batch=1, max_context=64, prefill_chunk=BLOCK, prefill_budget=BLOCK)
    pc = engine.prefix_cache
    long = random_prompts((40,), seed=5)[0].tolist()
    engine.submit(long, 1)
    engine.step()  # one block stored
    first = engine._prefilling[0].prefix_node
    pc._drop(first)  # evicted by other traffic between two steps of this prefill
    out = list(engine.run_until_done())[0]
    assert out.token_ids == greedy_by_full_forwards(model, torch.tensor(long), 1)
    assert pc.used_blocks == 0
    pc.check()


def test_bad_prefix_cache_settings_are_refused():
    model = tiny_model("GA")
    with pytest.raises(ValueError, match="holds no block"):
        Engine(model, max_batch=1, max_context=16, prefix_cache_bytes=10)
    with pytest.raises(ValueError, match="prefix_cache_bytes must be an integer >= 0"):
        Engine(model, max_batch=1, max_context=16, prefix_cache_bytes=-1)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        PrefixCache(Engine(model, max_batch=1, max_context=16).cache, 0, 10**6)
