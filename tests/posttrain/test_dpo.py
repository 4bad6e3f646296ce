"""DPO: both losses and their gradients against a direct float64 computation, the reference (precomputed or a
frozen model), the metrics, and exact resume in a fresh process."""

from __future__ import annotations

import math

import pytest
import torch

from olmo_hybrid.errors import ConfigError
from olmo_hybrid.model import HybridLM
from olmo_hybrid.posttrain.config import DPOConfig, build_posttrain_config, with_source_model
from olmo_hybrid.posttrain.dpo import REFERENCE_FILE, DPOTrainer
from olmo_hybrid.posttrain.losses import dpo_loss, response_logps, sequence_logps
from olmo_hybrid.posttrain.source import prepare_source
from olmo_hybrid.train.metrics import read_back, read_metrics
from train.conftest import use_fused_adamw  # tests/ is on the path: the trainer tests' helpers
from train.test_step_sync import CountHostReads

from .conftest import crash_then_resume, quiet

OVERRIDES = ["data.seq_len=96", "data.batch_size=2", "optim.lr=1e-3", "trainer.eval_interval=3",
             "trainer.log_interval=1", "trainer.save_interval=2", "trainer.device=cpu", "dpo.max_steps=6"]


def dpo_config(data, *extra):
    return build_posttrain_config(DPOConfig, None, [*OVERRIDES, f"data.path={data}", *extra])


def _toy_batch(seed: int):
    """3 rows of 10 positions over a 7-token vocabulary: chosen (doc 0), rejected (doc 1), padding (doc 2)."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.tensor([[0] * 4 + [1] * 5 + [2], [0] * 6 + [1] * 3 + [2], [0] * 3 + [1] * 7])
    labels = torch.randint(0, 7, (3, 10), generator=g)
    labels[:, 0] = -100  # a prompt token
    labels[0, 5] = labels[1, 6] = -100
    labels[doc_ids == 2] = -100
    for r in range(3):  # a sequence's last position has no label
        for d in (0, 1):
            labels[r, (doc_ids[r] == d).nonzero().max()] = -100
    logits = torch.randn(3, 10, 7, generator=g)
    ref = torch.randn(3, 2, generator=g, dtype=torch.float64) - 3
    return logits, labels, doc_ids, ref


@pytest.mark.parametrize("loss_type", ["dpo", "dpo_norm"])
def test_dpo_loss_and_gradient_equal_a_direct_float64_computation(loss_type):
    beta = 5.0 if loss_type == "dpo_norm" else 0.5
    logits, labels, doc_ids, ref = _toy_batch(0)
    x = logits.clone().requires_grad_(True)
    sums, counts = sequence_logps(x, labels, doc_ids)
    pi = response_logps(sums, counts, loss_type)
    losses, chosen_r, rejected_r = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0].float(), ref[:, 1].float(), beta)
    losses.mean().backward()

    x64 = logits.double().requires_grad_(True)
    want = []
    for r in range(3):
        logp = [torch.zeros((), dtype=torch.float64) for _ in range(2)]
        n = [0, 0]
        for t in range(10):
            if labels[r, t] >= 0:
                d = int(doc_ids[r, t])
                logp[d] = logp[d] + torch.log_softmax(x64[r, t], -1)[labels[r, t]]
                n[d] += 1
        if loss_type == "dpo_norm":
            logp = [logp[0] / n[0], logp[1] / n[1]]
        z = (logp[0] - logp[1]) - (ref[r, 0] - ref[r, 1])
        want.append(torch.log1p(torch.exp(-beta * z)))  # -log sigmoid(beta z)
        assert chosen_r[r].item() == pytest.approx((beta * (logp[0] - ref[r, 0])).item(), rel=1e-5, abs=1e-5)
    loss64 = torch.stack(want).mean()
    loss64.backward()
    assert losses.mean().item() == pytest.approx(loss64.item(), rel=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    assert x.grad.abs().sum() > 0 and x.grad[doc_ids == 2].abs().sum() == 0


def _fit(cfg, run, src, **patch):
    trainer = DPOTrainer(with_source_model(cfg, src.config), run, src, log=quiet)
    for name, value in patch.items():
        setattr(trainer, name, value)
    trainer.fit()
    return trainer, read_metrics(run / "metrics.jsonl")


@pytest.fixture(scope="module")
def straight(source, pairs_file, tmp_path_factory):
    """An uninterrupted 6-step DPO run with the precomputed reference."""
    src = prepare_source(source, log=quiet)
    run = tmp_path_factory.mktemp("dpo-straight")
    return src, run, _fit(dpo_config(pairs_file), run, src)[1]


def test_dpo_starts_at_log_2_logs_rewards_and_both_references_agree(straight, pairs_file, tmp_path):
    src, run, records = straight
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 1
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    for key in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        assert key in records[-1] and f"val_{key}" in records[-1]
    assert records[-1]["reward_margin"] != 0 and records[-1]["loss"] != records[0]["loss"]  # the policy moved
    assert (run / REFERENCE_FILE).is_file()
    _, with_model = _fit(dpo_config(pairs_file, "dpo.reference=model"), tmp_path, src)
    for a, b in zip(records, with_model):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["reward_accuracy"] == b["reward_accuracy"]


def test_dpo_resumes_exactly_in_a_fresh_process(straight, source, pairs_file, tmp_path):
    src, _, records = straight
    trainer = DPOTrainer(with_source_model(dpo_config(pairs_file), src.config), tmp_path, src, log=quiet)
    proc = crash_then_resume(trainer, "dpo", source, pairs_file, tmp_path, OVERRIDES)
    assert "reference log-probabilities from" in proc.stdout  # stored by the first process, not recomputed
    resumed = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records]
    assert [r["reward_margin"] for r in resumed] == [r["reward_margin"] for r in records]


def test_a_dpo_step_reads_nothing_back_from_the_device(source, pairs_file, tmp_path):
    """The reference lookup, the DPO loss and the reward metrics stay on the device until the trainer reads them
    back (the model's own forward, which reads document boundaries, is replaced as in test_step_sync.py)."""
    src = prepare_source(source, log=quiet)
    trainer = DPOTrainer(with_source_model(dpo_config(pairs_file), src.config), tmp_path, src, log=quiet)
    trainer.reference = trainer._score_reference()
    use_fused_adamw(trainer)
    lm = trainer.model
    trainer.forward_model = lambda ids, doc_ids=None: lm.lm_head(lm.model.embed_tokens(ids))
    trainer.train_step()  # the first step creates the optimizer state
    with CountHostReads() as mode:
        outputs = [trainer.train_step() for _ in range(2)]
    assert mode.calls == []
    records = read_back(outputs)
    for r in records:
        assert 0 <= r["reward_accuracy"] <= 1 and r["chosen_bpb"] > 0 and "skipped" not in r
        assert r["reward_margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"], abs=1e-5)


def test_precomputed_reference_equals_the_source_model_on_each_response_alone(source, pairs_file, tmp_path):
    """The stored reference numbers of every training and validation pair equal the source model's float64
    log-probabilities of that pair's chosen and rejected responses, each run alone (no packing, no batching)."""
    src = prepare_source(source, log=quiet)
    trainer = DPOTrainer(with_source_model(dpo_config(pairs_file, "data.batch_size=3"), src.config), tmp_path, src,
                         log=quiet)
    ref = trainer._score_reference()
    model = HybridLM(src.config, init=False)
    model.load_state_dict(src.state_dict)
    model.eval()
    rows = [trainer.train_rows, trainer.val_rows]
    n_pairs = sum(len(r["input_ids"]) for r in rows)
    assert ref["sums"].shape == ref["counts"].shape == (n_pairs, 2)
    for r in rows:
        for ids, labels, docs, index in zip(r["input_ids"], r["labels"], r["doc_ids"], r["pair_index"]):
            for d in (0, 1):  # chosen, rejected
                seq, lab = torch.from_numpy(ids[docs == d]), torch.from_numpy(labels[docs == d])
                with torch.no_grad():
                    logp = torch.log_softmax(model(seq[None])[0].double(), -1)
                scored = lab != -100
                want = logp[scored].gather(1, lab[scored][:, None]).sum()
                assert int(ref["counts"][index, d]) == int(scored.sum()) > 0
                assert ref["sums"][index, d].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("override, message", [
    ("dpo.label_smoothing=0.1", "unknown config field 'dpo.label_smoothing'"),
    ("dpo.loss=ipo", "dpo.loss: expected one of dpo, dpo_norm, got 'ipo'"),
    ("dpo.reference_free=true", "unknown config field 'dpo.reference_free'"),
    ("dpo.beta=0", "dpo.beta must be positive"),
])
def test_dpo_options_we_do_not_implement_are_refused_by_name(pairs_file, override, message):
    with pytest.raises(ConfigError, match=message):
        dpo_config(pairs_file, override).validate()
