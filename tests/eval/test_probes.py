"""Probe data generators are exact; a short probe run learns; model variants are what they claim."""

import itertools

import pytest
import torch

from olmo_hybrid.eval.probe_tasks import (
    IGNORE,
    S5_COMPOSE,
    S5_IDENTITY,
    S5_PERMS,
    TASKS,
    modular,
    mqar,
    parity,
    s5,
    state_recall,
)
from olmo_hybrid.eval.probes import (
    MODEL_VARIANTS,
    ProbeConfig,
    evaluate_probe,
    probe_model_config,
    results_table,
    run_probe,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_parity_labels_are_running_xor():
    ids, labels = parity(16, 37, _gen())
    assert ids.shape == labels.shape == (16, 37) and set(ids.unique().tolist()) == {0, 1}
    for row, lab in zip(ids.tolist(), labels.tolist()):
        assert lab == [sum(row[:t + 1]) % 2 for t in range(37)]


def test_modular_labels_evaluate_left_to_right():
    ids, labels = modular(8, 15, _gen(1), m=5)
    ops = {5: lambda a, b: a + b, 6: lambda a, b: a - b, 7: lambda a, b: a * b}
    for row, lab in zip(ids.tolist(), labels.tolist()):
        value = row[0]
        assert lab[0] == value
        for j in range(2, 15, 2):
            value = ops[row[j - 1]](value, row[j]) % 5
            assert lab[j] == value and lab[j - 1] == IGNORE
        assert all(0 <= t < 5 for t in row[0::2]) and all(5 <= t < 8 for t in row[1::2])


@pytest.mark.parametrize("length", [1, 2, 3, 4, 64])
def test_every_probe_gives_the_length_it_is_asked_for(length):
    # modular used to give length - 1 tokens at even lengths (so "trained at 64" meant 63)
    for name, task in TASKS.items():
        try:
            ids, labels = task.make(3, length, _gen())
        except ValueError:
            continue  # shorter than the task's minimum (mqar, state_recall)
        assert ids.shape == labels.shape == (3, length), name
        assert (labels != IGNORE).any(dim=1).all(), name
    ids, labels = modular(2, length, _gen(), m=5)
    assert (ids[:, -1] >= 5).all() if length % 2 == 0 else (ids[:, -1] < 5).all()


def test_s5_composition_table_and_running_product():
    assert sorted(S5_PERMS) == sorted(itertools.permutations(range(5)))
    for a, b in [(3, 77), (119, 5), (42, 42)]:
        pa, pb = S5_PERMS[a], S5_PERMS[b]
        assert S5_PERMS[S5_COMPOSE[a, b]] == tuple(pb[pa[i]] for i in range(5))
    ids, labels = s5(4, 12, _gen(2))
    for row, lab in zip(ids.tolist(), labels.tolist()):
        state = list(S5_PERMS[S5_IDENTITY])
        for t, x in enumerate(row):
            state = [S5_PERMS[x][state[i]] for i in range(5)]
            assert S5_PERMS[lab[t]] == tuple(state)


def test_mqar_queries_recall_their_values():
    num_kv, vocab = 6, 64
    ids, labels = mqar(10, 48, _gen(3), num_kv=num_kv, vocab=vocab)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        keys, values = row[0:2 * num_kv:2], row[1:2 * num_kv:2]
        assert len(set(keys)) == num_kv and all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        scored = [t for t in range(48) if lab[t] != IGNORE]
        assert len(scored) == num_kv and all(t >= 2 * num_kv and (t - 2 * num_kv) % 2 == 0 for t in scored)
        for t in scored:
            assert lab[t] == values[keys.index(row[t])]
    with pytest.raises(ValueError):
        mqar(2, 20, _gen(), num_kv=6)  # query region too short


def test_state_recall_answers_follow_the_swapped_pointers():
    slots, regs, values = 8, 3, 4
    ids, labels = state_recall(6, 40, _gen(4), num_slots=slots, num_regs=regs, num_values=values)
    slot0, reg0, swap0 = values, values + slots, values + slots + regs
    pairs = list(itertools.combinations(range(regs), 2))
    for row, lab in zip(ids.tolist(), labels.tolist()):
        memory = {row[2 * i] - slot0: row[2 * i + 1] for i in range(slots)}
        assert sorted(memory) == list(range(slots)) and all(0 <= v < values for v in memory.values())
        init = row[2 * slots:2 * slots + 2 * regs]
        ptr = {init[2 * j] - reg0: init[2 * j + 1] - slot0 for j in range(regs)}
        tail = row[2 * slots + 2 * regs:]
        n_swaps = len(tail) - 1 - regs
        for tok in tail[:n_swaps]:
            i, j = pairs[tok - swap0]
            ptr[i], ptr[j] = ptr[j], ptr[i]
        assert tail[n_swaps] == swap0 + len(pairs)  # the query marker
        for pos, tok in zip(range(len(row) - regs, len(row)), tail[n_swaps + 1:]):
            assert lab[pos] == memory[ptr[tok - reg0]]
        assert all(v == IGNORE for v in lab[:len(row) - regs])
    assert int(state_recall(2, 100, _gen())[0].max()) < TASKS["state_recall"].vocab_size


def test_model_variants_set_pattern_and_eigenvalue_range():
    cfg = ProbeConfig(n_layers=4)
    for name, (pattern, neg) in MODEL_VARIANTS.items():
        mc = probe_model_config(name, 2, cfg)
        assert mc.layer_pattern == pattern and mc.gdn_allow_neg_eigval == neg
    assert probe_model_config("hybrid", 2, ProbeConfig(n_layers=2)).layer_types == ["G", "A"]
    with pytest.raises(ValueError, match="unknown probe model"):
        probe_model_config("mamba", 2, cfg)


def test_short_parity_run_learns_and_reports_by_length():
    torch.manual_seed(0)
    cfg = ProbeConfig(task="parity", train_len=12, steps=40, batch_size=32, lr=3e-3, warmup=5, d_model=32,
                      n_layers=1, heads=2, eval_batches=1)
    res = run_probe(cfg, ["gdn"], quiet=True)
    r = res["models"]["gdn"]
    assert set(r["accuracy"]) == {"12", "24", "48"}
    assert r["final_loss"] < 0.6  # ln 2 = 0.69 is chance; ~0.45 after 40 steps
    assert r["accuracy"]["12"]["acc_tokens"] > 60.0
    assert "| gdn |" in results_table(res)


def test_evaluate_probe_scores_a_perfect_model_100():
    class RunningParity(torch.nn.Module):
        def forward(self, ids):
            par = ids.cumsum(1) % 2
            return torch.nn.functional.one_hot(par, 2).float()

    acc = evaluate_probe(RunningParity(), ProbeConfig(train_len=8, batch_size=4, eval_batches=2))
    assert acc == {n: {"acc_tokens": 100.0, "acc_last": 100.0} for n in (8, 16, 32)}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_test_sequences_never_repeat_training_sequences(task, monkeypatch):
    """train_probe and evaluate_probe draw from separate streams: no test sequence is a training sequence."""
    import dataclasses

    from olmo_hybrid.eval import probes

    seen = {"train": set(), "test": set()}
    phase = ["train"]
    spec = TASKS[task]

    def recording(batch, length, gen):
        ids, labels = spec.make(batch, length, gen)
        seen[phase[0]].update(tuple(r) for r in ids.tolist())
        return ids, labels

    monkeypatch.setitem(probes.TASKS, task, dataclasses.replace(spec, make=recording))

    class Lookup(torch.nn.Module):  # the cheapest model train_probe can step
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(spec.vocab_size, spec.vocab_size)

        def forward(self, ids):
            return self.table(ids)

    length = {"parity": 40, "modular": 25, "s5": 6, "mqar": 32, "state_recall": 90}[task]  # spaces >> 96 rows
    cfg = ProbeConfig(task=task, train_len=length, test_lens=[length], steps=3, batch_size=16, warmup=1,
                      eval_batches=3)
    probes.train_probe(Lookup(), cfg, quiet=True)
    phase[0] = "test"
    evaluate_probe(Lookup(), cfg)
    assert len(seen["train"]) == 48 and len(seen["test"]) == 48
    assert not seen["train"] & seen["test"]


def test_probes_without_out_never_rewrite_the_committed_results(tmp_path, monkeypatch):
    import pathlib
    import shutil

    from olmo_hybrid.eval.probes import main

    committed = pathlib.Path(__file__).resolve().parents[2] / "docs" / "probes" / "parity.json"
    (tmp_path / "docs" / "probes").mkdir(parents=True)
    shutil.copy(committed, tmp_path / "docs" / "probes" / "parity.json")
    before = (tmp_path / "docs" / "probes" / "parity.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["--merge", str(committed), "--no-plot"]) == 0
    assert (tmp_path / "runs" / "probes" / "parity.json").exists()
    assert (tmp_path / "docs" / "probes" / "parity.json").read_bytes() == before
