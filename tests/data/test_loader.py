"""TrainLoader / val_batches: content, determinism, rank sharding, resume, document ids, baselines."""

import json
import math

import numpy as np
import pytest
import torch

from olmo_hybrid.config import ConfigError, apply_overrides, from_dict
from olmo_hybrid.data.corpus import DataError
from olmo_hybrid.data.dataset import TokenDataset, bits_per_byte, unigram_loss
from olmo_hybrid.data.loader import DataConfig, TrainLoader, open_datasets, val_batches
from olmo_hybrid.data.prepare import prepare

from .conftest import random_documents

T, B = 16, 4


@pytest.fixture(scope="module")
def train(small_dataset):
    return TokenDataset(small_dataset, "train")


def _window_index(ds, seq_len):
    """Map each training window's token content to its index (windows are distinct in random text)."""
    n = ds.num_windows(seq_len)
    table = {ds.tokens[i * seq_len:i * seq_len + seq_len + 1].tobytes(): i for i in range(n)}
    assert len(table) == n
    return table


def _windows_of(batch, table):
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy().astype(np.uint32)
    return [table[row.tobytes()] for row in full]


def test_batches_are_shifted_windows_of_the_stream(train):
    loader = TrainLoader(train, T, B, seed=0)
    table = _window_index(train, T)
    for _ in range(5):
        batch = loader.next_batch()
        assert set(batch) == {"input_ids", "labels"}
        assert batch["input_ids"].shape == batch["labels"].shape == (B, T)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
        for w, row in zip(_windows_of(batch, table), batch["input_ids"]):
            assert np.array_equal(row.numpy(), train.tokens[w * T:(w + 1) * T])


def test_epoch_visits_distinct_windows_and_order_depends_on_seed_and_epoch(train):
    table = _window_index(train, T)
    loader = TrainLoader(train, T, B, seed=7, max_epochs=2)
    batches = list(loader)
    assert len(batches) == 2 * len(loader) and len(loader) == train.num_windows(T) // B
    epoch0 = [w for b in batches[:len(loader)] for w in _windows_of(b, table)]
    epoch1 = [w for b in batches[len(loader):] for w in _windows_of(b, table)]
    assert len(set(epoch0)) == len(epoch0) == len(loader) * B
    assert epoch0 != epoch1
    again = [w for b in list(TrainLoader(train, T, B, seed=7, max_epochs=1)) for w in _windows_of(b, table)]
    assert again == epoch0
    other = [w for b in list(TrainLoader(train, T, B, seed=8, max_epochs=1)) for w in _windows_of(b, table)]
    assert other != epoch0


def test_rank_shards_are_disjoint_and_cover_the_global_batches(train):
    world = 3
    table = _window_index(train, T)
    ranks = [TrainLoader(train, T, B, seed=1, rank=r, world_size=world, max_epochs=1) for r in range(world)]
    single = TrainLoader(train, T, B * world, seed=1, max_epochs=1)
    assert len(ranks[0]) == len(single) == train.num_windows(T) // (B * world)
    per_rank = [[w for b in loader for w in _windows_of(b, table)] for loader in ranks]
    assert all(not set(a) & set(b) for i, a in enumerate(per_rank) for b in per_rank[i + 1:])
    covered = set().union(*per_rank)
    assert len(covered) == len(single) * B * world
    assert covered == set(TrainLoader(train, T, B, seed=1).window_order(0)[:len(covered)].tolist())
    for step, batch in enumerate(TrainLoader(train, T, B * world, seed=1, max_epochs=1)):
        stacked = torch.cat([batch["input_ids"][r * B:(r + 1) * B] for r in range(world)])
        assert _windows_of({"input_ids": stacked, "labels": batch["labels"]}, table) == \
            [w for r in range(world) for w in per_rank[r][step * B:(step + 1) * B]]


@pytest.mark.parametrize("consumed", [3, "epoch_end"])
def test_resume_mid_epoch_gives_the_same_remaining_batches(train, consumed):
    first = TrainLoader(train, T, B, seed=2, doc_masking=True, rank=1, world_size=2)
    n = len(first) if consumed == "epoch_end" else consumed
    for _ in range(n):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    expected = [first.next_batch() for _ in range(len(first) + 2)]  # runs into the next epoch
    resumed = TrainLoader(train, T, B, seed=2, doc_masking=True, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_refuses_a_different_setup(train):
    state = TrainLoader(train, T, B, seed=2).state_dict()
    with pytest.raises(DataError, match="batch_size=4, this loader has batch_size=8"):
        TrainLoader(train, T, 2 * B, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="seed=2"):
        TrainLoader(train, T, B, seed=3).load_state_dict(state)


def test_doc_ids_change_exactly_after_eos(train):
    eos = train.eos_token_id
    loader = TrainLoader(train, T * 4, B, seed=0, doc_masking=True)
    changes = 0
    for _ in range(len(loader)):
        batch = loader.next_batch()
        ids, docs = batch["input_ids"], batch["doc_ids"]
        assert docs.dtype == torch.long and docs.shape == ids.shape
        step = docs[:, 1:] - docs[:, :-1]
        assert torch.equal(step != 0, ids[:, :-1] == eos)
        assert bool((step >= 0).all()) and bool((step <= 1).all())
        changes += int((step != 0).sum())
    assert changes > 0
    first_doc = train.doc_ids(np.array([0, int(train.offsets[1]) - 1, int(train.offsets[1])]))
    assert first_doc.tolist() == [0, 0, 1]


def test_val_batches_cover_every_token_once(small_dataset):
    val = TokenDataset(small_dataset, "val")
    labels = [b["labels"].reshape(-1) for b in val_batches(val, T, B)]
    assert torch.equal(torch.cat(labels), torch.from_numpy(val.tokens[1:].astype(np.int64)))
    assert labels[-1].numel() == (val.n_tokens - 1) % T or (val.n_tokens - 1) % T == 0
    rows = lambda batches: sorted(tuple(row.tolist()) for b in batches for row in b["labels"])  # noqa: E731
    shards = [rows(val_batches(val, T, B, rank=r, world_size=2)) for r in range(2)]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == rows(val_batches(val, T, B))
    assert len(list(val_batches(val, T, B, max_batches=2))) == 2
    with_docs = next(val_batches(val, T, B, doc_masking=True))
    assert with_docs["doc_ids"].shape == with_docs["input_ids"].shape


def test_context_parallel_ranks_get_slices_of_the_same_batches(train, small_dataset):
    """CP rank c of n gets columns [c T/n, (c+1) T/n) of the batches one rank gets, for training and validation;
    the validation tail is padded to T with unscored positions so it splits too; the resume state is the same."""
    n = 4
    whole = TrainLoader(train, T, B, seed=3, doc_masking=True, rank=1, world_size=2)
    ranks = [TrainLoader(train, T, B, seed=3, doc_masking=True, rank=1, world_size=2, cp_rank=c, cp_degree=n)
             for c in range(n)]
    for _ in range(3):
        want, got = whole.next_batch(), [r.next_batch() for r in ranks]
        for key in ("input_ids", "labels", "doc_ids"):
            assert torch.equal(torch.cat([g[key] for g in got], dim=1), want[key])
            assert got[0][key].shape == (B, T // n)
    assert all(r.state_dict() == whole.state_dict() for r in ranks)

    val = TokenDataset(small_dataset, "val")
    want = list(val_batches(val, T, B, doc_masking=True))
    got = list(zip(*(val_batches(val, T, B, doc_masking=True, cp_rank=c, cp_degree=n) for c in range(n))))
    assert len(got) == len(want) and want[-1]["labels"].shape[1] < T  # the split ends in a shorter tail
    for parts, w in zip(got, want):
        joined = {k: torch.cat([p[k] for p in parts], dim=1) for k in w}
        tail = w["labels"].shape[1]
        assert all(torch.equal(joined[k][:, :tail], w[k]) for k in w)
        assert (joined["labels"][:, tail:] == -100).all() and joined["labels"].shape[1] == T
        assert (joined["doc_ids"][:, tail:] == w["doc_ids"][:, -1:]).all()
    with pytest.raises(DataError, match="cp_degree must divide seq_len=16"):
        TrainLoader(train, T, B, cp_rank=0, cp_degree=3)


def test_too_small_corpus_and_bad_arguments(tmp_path, train):
    tiny = prepare(None, tmp_path / "tiny", documents=random_documents(3, seed=9, max_words=30), bpe_vocab=270,
                   val_fraction=0, progress=False)
    ds = TokenDataset(tiny, "train")
    with pytest.raises(DataError, match="fewer than one training sequence"):
        TrainLoader(ds, ds.n_tokens, 1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        TrainLoader(ds, ds.n_tokens // 2, 4)
    with pytest.raises(DataError, match="rank must be in"):
        TrainLoader(train, T, B, rank=2, world_size=2)
    with pytest.raises(DataError, match="fewer than one training sequence"):
        open_datasets(DataConfig(path=str(tiny), seq_len=ds.n_tokens))
    with pytest.raises(DataError, match="does not exist"):
        TokenDataset(tmp_path / "missing")
    with pytest.raises(DataError, match="unknown split 'test'"):
        TokenDataset(tiny, "test")
    (tmp_path / "tiny" / "train.tokens.bin").write_bytes(b"\0" * 8)
    with pytest.raises(DataError, match="prepare the data again"):
        TokenDataset(tiny, "train")


@pytest.mark.parametrize("kwargs,message", [
    (dict(seq_len=0), "seq_len must be a positive integer, got 0"),
    (dict(seq_len=-2), "seq_len must be a positive integer, got -2"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(batch_size=-1), "batch_size must be a positive integer, got -1"),
    (dict(seq_len=4.0), "seq_len must be a positive integer, got 4.0"),
    (dict(rank=2, world_size=2), r"rank must be in \[0, world_size=2\), got 2"),
    (dict(cp_rank=1, cp_degree=1), r"cp_rank must be in \[0, cp_degree=1\)"),
])
def test_train_and_val_refuse_sizes_and_ranks_that_cut_no_windows(train, kwargs, message):
    args = dict(seq_len=T, batch_size=B) | kwargs
    with pytest.raises(DataError, match=message):
        TrainLoader(train, **args)
    with pytest.raises(DataError, match=message):
        next(val_batches(train, **args))


def test_data_config(small_dataset):
    cfg = from_dict(DataConfig, {"path": str(small_dataset), "seq_len": 32, "batch_size": 2, "doc_masking": "true"})
    cfg = apply_overrides(cfg, ["seq_len=16"])
    assert (cfg.seq_len, cfg.doc_masking) == (16, True)
    train, val = open_datasets(cfg)
    assert val is not None and val.n_docs > 0
    assert "doc_ids" in TrainLoader.from_config(cfg, train).next_batch()
    with pytest.raises(ConfigError, match="data.seq_len"):
        DataConfig(seq_len=0)
    with pytest.raises(ConfigError, match="data.bpe_vocab"):
        DataConfig(bpe_vocab=100)
    with pytest.raises(ConfigError, match="unknown config field 'shuffle'"):
        from_dict(DataConfig, {"shuffle": True})


def test_unigram_loss_and_bits_per_byte(small_dataset, train):
    val = TokenDataset(small_dataset, "val")
    loss = unigram_loss(train, val)
    counts = torch.bincount(torch.from_numpy(train.tokens.astype(np.int64)), minlength=train.vocab_size).double()
    logits = torch.log(counts + 1.0).expand(val.n_tokens - 1, -1)  # softmax of log(count+1) = add-one estimate
    targets = torch.from_numpy(val.tokens[1:].astype(np.int64))
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-9)
    assert loss < math.log(train.vocab_size)  # the corpus is far from uniform over the vocabulary
    assert bits_per_byte(loss, val) == pytest.approx(loss / math.log(2) * val.n_tokens / val.n_bytes)
