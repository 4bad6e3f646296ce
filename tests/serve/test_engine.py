"""Engine: exact greedy tokens, per-row decode numerics, continuous batching, EOS and stop strings, abort."""

import random

import pytest
import torch
from serve_util import VOCAB, LetterTokenizer, greedy_by_full_forwards, random_prompts, tiny_model

from olmo_hybrid.serve import Engine, MemoryBudgetError, SamplingParams
from olmo_hybrid.serve.verify import greedy_disagreements

LENGTHS = (1, 7, 33, 70)


@pytest.mark.parametrize("pattern,extra", [
    ("GGGA", {}),
    ("G", {}),
    ("A", {"n_kv_heads": 2}),  # all attention, grouped KV heads
    ("GA", {"rope_theta": None}),  # NoPE attention, as the released 7B
    ("MMMA", {}),  # the paper's hybrid Mamba2 baseline
])
def test_greedy_tokens_equal_loop_of_full_forwards(pattern, extra):
    model = tiny_model(pattern, **extra)
    prompts = random_prompts(LENGTHS)
    # prefill_chunk=16 splits the longer prompts, so later chunks attend to earlier ones through the cache.
    engine = Engine(model, max_batch=4, max_context=90, prefill_chunk=16)
    outs = engine.generate(prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == greedy_by_full_forwards(model, prompt, 12)
        assert out.finish_reason == "length" and out.prompt_ids == prompt.tolist()
    assert engine.stats.max_running == 4 and not engine.has_work


def test_teacher_forced_check_finds_exactly_the_wrong_tokens():
    model = tiny_model("GGGA")
    prompt = random_prompts((9,))[0]
    good = greedy_by_full_forwards(model, prompt, 10)
    assert greedy_disagreements(model, prompt, good) == []
    bad = good[:7]  # later tokens would be judged in a changed context
    bad[6] = (bad[6] + 1) % VOCAB
    found = greedy_disagreements(model, prompt, bad)
    assert [(d.index, d.token, d.argmax) for d in found] == [(6, bad[6], good[6])] and found[0].gap > 0


def test_equal_length_prompts_and_a_hole_in_the_batch():
    # Equal lengths take the unmasked attention path, also after the middle request leaves a free row.
    model = tiny_model("GAGA")
    prompts = random_prompts((16, 16, 16))
    engine = Engine(model, max_batch=3, max_context=40)
    ids = [engine.submit(p, n) for p, n in zip(prompts, (10, 4, 10))]
    outs = {o.request_id: o for o in engine.run_until_done()}
    for rid, p, n in zip(ids, prompts, (10, 4, 10)):
        assert outs[rid].token_ids == greedy_by_full_forwards(model, p, n)


@pytest.mark.parametrize("prefill_budget,pattern", [(None, "GGGA"), (8, "GGGA"), (8, "MGMA")])
def test_continuous_batching_equals_each_request_alone(prefill_budget, pattern):
    model = tiny_model(pattern)
    prompts = random_prompts((12, 3, 50, 8, 25, 1))
    new = [9, 3, 6, 12, 4, 7]
    params = [SamplingParams(), SamplingParams(temperature=0.9, top_k=10, seed=5), SamplingParams(),
              SamplingParams(temperature=1.2, top_p=0.8, seed=11), SamplingParams(), SamplingParams(seed=2)]
    engine = Engine(model, max_batch=2, max_context=64, prefill_chunk=32, prefill_budget=prefill_budget)
    streamed = {}

    def on_token(rid, token):
        streamed.setdefault(rid, []).append(token)

    ids = [engine.submit(p, n, s, on_token=on_token) for p, n, s in zip(prompts[:3], new[:3], params[:3])]
    outs = engine.step() + engine.step()  # two requests running, one waiting
    ids += [engine.submit(p, n, s, on_token=on_token) for p, n, s in zip(prompts[3:], new[3:], params[3:])]
    outs += list(engine.run_until_done())  # the last three joined mid-flight
    assert sorted(o.request_id for o in outs) == sorted(ids)
    assert all(streamed[o.request_id] == o.token_ids for o in outs)
    assert all(0 < o.first_token_s <= o.total_s for o in outs)
    assert engine.stats.max_running == 2 and engine.cache.num_free == 2
    by_id = {o.request_id: o for o in outs}
    for rid, p, n, s in zip(ids, prompts, new, params):
        alone = Engine(model, max_batch=1, max_context=64, prefill_chunk=32).generate([p], n, s)[0]
        assert by_id[rid].token_ids == alone.token_ids, rid
        assert len(alone.token_ids) == n
        if s.greedy:
            assert alone.token_ids == greedy_by_full_forwards(model, p, n)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model("GGGA")
    prompt = random_prompts((10,))[0]
    engine = Engine(model, max_batch=3, max_context=40)
    a, b, c = engine.generate([prompt] * 3, 20, SamplingParams(temperature=1.0, seed=7))
    d = engine.generate([prompt], 20, SamplingParams(temperature=1.0, seed=8))[0]
    assert a.token_ids == b.token_ids == c.token_ids
    assert d.token_ids != a.token_ids
    # Near-uniform sampling: every step must draw fresh noise, else the same token would win each time.
    flat = engine.generate([prompt], 30, SamplingParams(temperature=1e4, seed=3))[0]
    assert len(set(flat.token_ids)) > 15


def test_eos_ends_a_request_at_its_first_occurrence():
    model = tiny_model("GGGA")
    prompts = random_prompts((9, 4))
    free = Engine(model, max_batch=2, max_context=40).generate(prompts, 15)
    eos = free[0].token_ids[4]
    first = free[0].token_ids.index(eos)
    engine = Engine(model, max_batch=2, max_context=40, eos_token_id=eos, tokenizer=LetterTokenizer())
    out = engine.generate(prompts, 15)
    assert out[0].token_ids == free[0].token_ids[:first + 1]
    assert out[0].finish_reason == "eos" and out[0].stop == eos
    assert out[0].text == LetterTokenizer().decode(free[0].token_ids[:first])
    if eos not in free[1].token_ids:
        assert out[1].token_ids == free[1].token_ids and out[1].finish_reason == "length"
    ignored = engine.generate(prompts[:1], 15, ignore_eos=True)[0]
    assert ignored.token_ids == free[0].token_ids


def test_stop_string_spanning_tokens_cuts_the_text():
    model = tiny_model("GGGA")
    tok = LetterTokenizer()
    prompt = random_prompts((6,))[0]
    engine = Engine(model, max_batch=1, max_context=60, tokenizer=tok)
    free = engine.generate([prompt], 40)[0]
    full = tok.decode(free.token_ids)
    stop = full[9:13]
    cut = full.find(stop)
    need = next(m for m in range(1, 41) if stop in tok.decode(free.token_ids[:m]))
    out = engine.generate([prompt], 40, stop=[stop, "not-a-letter"])[0]
    assert out.finish_reason == "stop" and out.stop == stop
    assert out.token_ids == free.token_ids[:need]
    assert out.text == full[:cut]
    stop_token = engine.submit(prompt, 40, stop_token_ids=[free.token_ids[3]])
    out = next(o for o in engine.run_until_done() if o.request_id == stop_token)
    assert out.finish_reason == "stop" and out.token_ids[-1] == free.token_ids[3]


def test_of_two_stop_strings_one_token_completes_the_text_ends_before_the_first():
    model = tiny_model("GGGA")
    tok = LetterTokenizer()
    prompt = random_prompts((6,))[0]
    engine = Engine(model, max_batch=1, max_context=60, tokenizer=tok)
    free = engine.generate([prompt], 40)[0].token_ids
    full = tok.decode(free)
    # A doubled letter "cc" after a "b" (at character q): its token completes both "cc" and "bc"; "bc" starts first.
    def stops_at(j):
        q = len(tok.decode(free[:j]))
        early, late = full[q - 1:q + 1], full[q:q + 2]
        return q, early, late, free[j] % 3 == 0 and early not in full[:q] and late not in full[:q + 1]

    j = next(j for j in range(1, 40) if stops_at(j)[3])
    q, early, late, _ = stops_at(j)
    for stops in ([late, early], [early, late]):
        out = engine.generate([prompt], 40, stop=stops)[0]
        assert (out.finish_reason, out.stop, out.token_ids) == ("stop", early, free[:j + 1]), stops
        assert out.text == full[:q - 1]


def test_abort_frees_the_slot_without_disturbing_others():
    model = tiny_model("GGGA")
    prompts = random_prompts((5, 11, 7))
    engine = Engine(model, max_batch=2, max_context=40)
    a, b, c = (engine.submit(p, 10) for p in prompts)
    engine.step()
    assert engine.abort(a).finish_reason == "aborted"
    assert engine.abort(c).finish_reason == "aborted"  # still waiting
    assert engine.abort(12345) is None
    rest = list(engine.run_until_done())
    assert [o.request_id for o in rest] == [b]
    assert rest[0].token_ids == greedy_by_full_forwards(model, prompts[1], 10)


def test_abort_all_frees_every_slot_even_one_a_failed_step_lost():
    model = tiny_model("GGGA")
    engine = Engine(model, max_batch=2, max_context=40)
    ids = [engine.submit(p, 10) for p in random_prompts((5, 11, 7))]
    engine.step()
    del engine._running[0]  # as if a step raised between taking the slot and recording the request
    outs = engine.abort_all()
    assert sorted(o.request_id for o in outs if o) == ids[1:] and all(o.finish_reason == "aborted" for o in outs if o)
    assert not engine.has_work and engine.cache.num_free == 2 and not engine._active.any()
    out = engine.generate(random_prompts((6,)), 4)[0]
    assert out.token_ids == greedy_by_full_forwards(model, random_prompts((6,))[0], 4)


def test_bad_requests_are_rejected_with_clear_errors():
    engine = Engine(tiny_model("GGGA"), max_batch=1, max_context=20)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        engine.submit([], 3)
    with pytest.raises(ValueError, match=f"token id {VOCAB} outside the vocabulary"):
        engine.submit([1, VOCAB], 3)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        engine.submit(torch.ones(2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        engine.submit([1, 2], 0)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.submit([1, 2], 3, stop="x")
    with pytest.raises(TypeError, match="sampling must be a SamplingParams"):
        engine.submit([1, 2], 3, sampling={"temperature": 1.0})
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_seq_len=400"):
        Engine(tiny_model("GGGA"), max_batch=1, max_context=401)
    with pytest.raises(MemoryBudgetError, match="needs 23 tokens"):
        engine.generate([[1, 2], [3] * 20], 3)  # the second prompt does not fit: nothing runs
    assert not engine.has_work
    engine.submit([1, 2], 3)
    with pytest.raises(RuntimeError, match="generate needs an idle engine"):
        engine.generate([[3, 4]], 3)


@pytest.mark.parametrize("prefill_budget", [None, 5])
def test_random_arrivals_and_aborts_match_running_alone(prefill_budget):
    rng = random.Random(0)
    model = tiny_model("GAGG")
    engine = Engine(model, max_batch=3, max_context=48, prefill_chunk=8, prefill_budget=prefill_budget)
    specs, outs, aborted = {}, {}, set()
    prompts = random_prompts([rng.randint(1, 30) for _ in range(16)], seed=4)
    queue = list(prompts)
    while queue or engine.has_work:
        for _ in range(rng.randint(0, 2)):
            if queue:
                params = SamplingParams() if rng.random() < 0.5 else \
                    SamplingParams(temperature=rng.uniform(0.5, 1.5), top_k=rng.choice([0, 5]), seed=rng.randint(0, 99))
                p, n = queue.pop(), rng.randint(1, 12)
                specs[engine.submit(p, n, params)] = (p, n, params)
        busy = list(engine._running.values()) + list(engine._prefilling)
        if busy and rng.random() < 0.1:
            victim = rng.choice(busy).id
            aborted.add(victim)
            assert engine.abort(victim).finish_reason == "aborted"
        outs.update({o.request_id: o for o in engine.step()})
    assert set(outs) | aborted == set(specs) and aborted and engine.stats.max_running == 3
    for rid, out in outs.items():
        p, n, params = specs[rid]
        alone = Engine(model, max_batch=1, max_context=48, prefill_chunk=8).generate([p], n, params)[0]
        assert out.token_ids == alone.token_ids, rid


def test_prefill_budget_keeps_running_requests_decoding():
    model = tiny_model("GGGA")
    first, second, long = random_prompts((4, 6, 60))
    engine = Engine(model, max_batch=2, max_context=80, prefill_chunk=16, prefill_budget=10)
    seen = []
    a = engine.submit(first, 2)
    b = engine.submit(second, 14, on_token=lambda rid, tok: seen.append(rid))
    outs = {o.request_id: o for o in engine.step() + engine.step()}
    assert a in outs and engine.cache.num_free == 1  # slot 0 is free again, below the running slot 1
    c = engine.submit(long, 5, on_token=lambda rid, tok: seen.append(rid))
    engine.step()
    assert engine._prefilling[0].slot == 0  # parked inside the decode batch while its prompt is prefilled
    outs.update({o.request_id: o for o in engine.run_until_done()})
    # The long prompt takes 6 steps of 10 tokens; the running request gains a token in every one of them.
    start = seen.index(b, 2)
    assert seen[start:start + 6] == [b] * 6 and seen.index(c) > start + 5
    for rid, prompt, n in ((a, first, 2), (b, second, 14), (c, long, 5)):
        assert outs[rid].token_ids == greedy_by_full_forwards(model, prompt, n)


def test_stop_strings_with_the_real_tokenizer():
    from olmo_hybrid.data import load_tokenizer

    tok = load_tokenizer("dolma2")
    model = tiny_model("GGGA", vocab_size=100352, d_model=32, n_heads=2, gdn_heads=2, gdn_head_k=8, gdn_head_v=16,
                       mlp_hidden=64)
    engine = Engine(model, max_batch=2, max_context=64, tokenizer=tok)
    assert engine.eos_token_ids == {tok.eos_token_id}
    prompt = torch.tensor(tok.encode("To be, or not to be, that is the question:"))
    free = engine.generate([prompt], 40, ignore_eos=True)[0]
    full = tok.decode(free.token_ids)
    stop = full[len(full) // 2:len(full) // 2 + 6]
    need = next(m for m in range(1, 41) if stop in tok.decode(free.token_ids[:m]))
    out = engine.generate([prompt], 40, stop=stop, ignore_eos=True)[0]
    assert (out.finish_reason, out.stop, out.token_ids) == ("stop", stop, free.token_ids[:need])
    assert out.text == full[:full.find(stop)]


def test_model_generate_cuts_rows_at_stop_strings_and_pads_them():
    model = tiny_model("GGGA")
    tok = LetterTokenizer()
    prompts = random_prompts((6, 9))
    engine = Engine(model, max_batch=2, max_context=40, tokenizer=tok)
    stop = tok.decode(engine.generate(prompts[:1], 20)[0].token_ids)[6:9]
    want = [o.token_ids for o in engine.generate(prompts, 20, stop=stop)]
    assert len(want[0]) < 20  # the first row stops early
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 9 - len(p):], mask[row, 9 - len(p):] = p, 1
    out = model.generate(ids, 20, stop=stop, tokenizer=tok, attention_mask=mask, pad_token_id=VOCAB - 1)
    width = max(len(w) for w in want)
    assert out.shape == (2, 9 + width) and torch.equal(out[:, :9], ids)
    for row, w in enumerate(want):
        assert out[row, 9:].tolist() == w + [VOCAB - 1] * (width - len(w))
    if len(want[0]) != len(want[1]):
        with pytest.raises(ValueError, match="pass pad_token_id"):
            model.generate(ids, 20, stop=stop, tokenizer=tok, attention_mask=mask)

