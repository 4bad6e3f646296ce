"""The device sampler: greedy rows, the sampled distribution, top-k / top-p support, seeds and counters."""

import torch

from olmo_hybrid.model.sampling import sample, uniform_noise


def rows(n, temperature=1.0, top_k=0, top_p=1.0, seed=0, counter=None):
    counter = torch.arange(n) if counter is None else counter
    return (torch.full((n,), float(temperature)), torch.full((n,), top_k), torch.full((n,), float(top_p)),
            torch.full((n,), seed), counter)


def frequencies(tokens, vocab):
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)


def test_samples_follow_the_softmax_of_tempered_logits():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    for temperature in (1.0, 0.5):
        tokens = sample(logits.expand(n, -1), *rows(n, temperature=temperature))
        expected = (logits / temperature).softmax(-1)
        assert (frequencies(tokens, 6) - expected).abs().max() < 0.015, temperature


def test_top_k_and_top_p_restrict_and_renormalise():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -2.0, -4.0])
    n = 20000
    probs = logits.softmax(-1)
    tokens = sample(logits.expand(n, -1), *rows(n, top_k=3))
    assert (frequencies(tokens, 8) - torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(5)])).abs().max() < 0.015
    # top_p=0.75: the first two tokens hold 0.62 < 0.75, the third brings it over, so three tokens stay.
    assert probs[:2].sum() < 0.75 <= probs[:3].sum()
    tokens = sample(logits.expand(n, -1), *rows(n, top_p=0.75))
    assert set(tokens.tolist()) == {0, 1, 2}
    # Within the renormalised top 2 the first token holds 0.62: top_p=0.6 keeps it alone, 0.7 keeps both.
    assert set(sample(logits.expand(n, -1), *rows(n, top_k=2, top_p=0.6)).tolist()) == {0}
    tokens = sample(logits.expand(n, -1), *rows(n, top_k=2, top_p=0.7))
    assert set(tokens.tolist()) == {0, 1}


def test_rows_keep_their_own_parameters_and_greedy_rows_take_the_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    temperature = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    top_k = torch.tensor([0, 1, 5, 0, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e-6, 1.0])
    tokens = sample(logits, temperature, top_k, top_p, torch.arange(6), torch.zeros(6, dtype=torch.long))
    argmax = logits.argmax(-1)
    # Greedy rows, top_k=1 and a tiny top_p all reduce to the argmax.
    for r in (0, 1, 2, 4, 5):
        assert tokens[r] == argmax[r], r
    assert torch.equal(sample(logits, *rows(6, temperature=0.0), all_greedy=True), argmax)


def test_draws_are_a_pure_function_of_seed_counter_and_token():
    ids = torch.arange(1000)[None].expand(3, -1)
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 0, 0]), ids)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.01
    v = uniform_noise(torch.tensor([1]), torch.tensor([1]), ids[:1])
    assert not torch.equal(u[0], v[0])
    # No visible correlation between neighbouring token ids or successive counters.
    assert abs(torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1]) < 0.1
    assert abs(torch.corrcoef(torch.stack([u[0], v[0]]))[0, 1]) < 0.1
    big = uniform_noise(torch.tensor([2**62 + 5]), torch.tensor([2**40]), ids[:1])
    assert (big > 0).all() and (big < 1).all()
