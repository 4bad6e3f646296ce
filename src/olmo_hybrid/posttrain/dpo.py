"""DPO on the project's trainer: one preference pair per row (chosen, then rejected, then padding), the
sigmoid ``dpo`` or length-normalised ``dpo_norm`` loss against a frozen reference, reward accuracy and
margins in every step's metrics and every validation.

The reference is the source model. ``dpo.reference=precomputed`` (default) scores every pair with it once,
before the first step, and keeps only those numbers (``RUN/dpo_reference.json``, reused on resume; on the
device, indexed there), so no second model is held in memory; ``dpo.reference=model`` keeps a frozen copy and
scores each batch with it. Both give the same loss.

The loss of a step is the mean over its pairs (``data.batch_size`` per micro-batch x ``trainer.grad_accum``
x ranks). Metrics per step and per validation: ``loss``, ``reward_accuracy`` (chosen reward > rejected),
``reward_margin``, ``chosen_reward``, ``rejected_reward`` (means; rewards are beta * (policy - reference)
log-probabilities, normalised like the loss); a validation's ``val_bpb`` is the policy's bits per byte on the
chosen responses. A step's metrics stay on the device with its loss (``StepOutput.extra``) until the trainer
reads them back, so DPO adds no host sync to a step.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from olmo_hybrid.distributed import all_reduce
from olmo_hybrid.errors import ConfigError
from olmo_hybrid.fsio import atomic_write_text
from olmo_hybrid.posttrain.examples import tokenize_pairs
from olmo_hybrid.posttrain.losses import dpo_loss, response_logps, sequence_logps
from olmo_hybrid.posttrain.packing import build_rows
from olmo_hybrid.posttrain.trainer import PostTrainer, start
from olmo_hybrid.train.loss import ValResult
from olmo_hybrid.train.metrics import StepOutput, read_metrics

REFERENCE_FILE = "dpo_reference.json"
# Per-step sums: loss, correct, margin, chosen reward, rejected reward, pairs, chosen nats, chosen tokens, chosen bytes
STATS = ("loss", "correct", "margin", "chosen_reward", "rejected_reward", "pairs", "chosen_nats", "chosen_tokens",
         "chosen_bytes")


@dataclass
class DPOValResult(ValResult):
    stats: dict | None = None


def _metrics(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """The means of a step's or a validation's ``STATS`` sums, as 0-d tensors where the sums are."""
    s = dict(zip(STATS, sums.unbind()))
    n = s["pairs"].clamp(min=1.0)
    return {"loss": s["loss"] / n, "reward_accuracy": s["correct"] / n, "reward_margin": s["margin"] / n,
            "chosen_reward": s["chosen_reward"] / n, "rejected_reward": s["rejected_reward"] / n,
            "chosen_bpb": s["chosen_nats"] / math.log(2) / s["chosen_bytes"].clamp(min=1.0)}


class DPOTrainer(PostTrainer):
    what = "pairs"

    def __init__(self, cfg, run_dir, source, resume: bool = False, log=print, overwrite: bool = False):
        super().__init__(cfg, run_dir, source, resume=resume, log=log, overwrite=overwrite)
        self._sums = None
        self.reference_model = self.reference = None
        if cfg.dpo.reference == "model":
            from olmo_hybrid.model import HybridLM

            self.reference_model = HybridLM(cfg.model, init=False)
            self.reference_model.load_state_dict(source.state_dict)
            self.reference_model.to(self.device).eval().requires_grad_(False)

    # -- data --------------------------------------------------------------------------------------
    def _rows(self, records, train):
        d = self.cfg.data
        pairs, report = tokenize_pairs(records, self.chat, d.seq_len, d.truncation)
        if not pairs:
            raise ConfigError(f"no {'training' if train else 'validation'} pair is left to train on")
        rows = build_rows([(p.chosen, p.rejected) for p in pairs], d.seq_len, self.pad_id)
        # One table of reference numbers for training and validation pairs: validation indices follow.
        first = 0 if train else len(self.train_rows["input_ids"])
        rows["pair_index"] = np.arange(first, first + len(pairs), dtype=np.int64)
        rows["chosen_bytes"] = np.array([p.chosen.n_bytes for p in pairs], dtype=np.int64)
        return rows, report, [s for p in pairs for s in (p.chosen, p.rejected)]

    # -- the reference -----------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        h = hashlib.sha256(str(self.source.path.resolve()).encode())
        for rows in (self.train_rows, self.val_rows):
            for key in ("input_ids", "labels", "doc_ids"):
                h.update(np.ascontiguousarray(rows[key]).tobytes())
        return h.hexdigest()

    def _prepare_run_dir(self) -> None:
        """The precomputed reference is scored with the source weights, so before a resume restores the policy,
        and written once the run directory is ready (locked, cleared by ``overwrite``)."""
        computed = False
        if self.reference_model is None:
            self.reference = self._stored_reference() if self.resume else None
            if self.reference is None:
                self.reference, computed = self._score_reference(), True
        super()._prepare_run_dir()
        if computed and self.env.is_main:
            atomic_write_text(self.run_dir / REFERENCE_FILE, json.dumps(
                {"fingerprint": self._fingerprint(), "source": str(self.source.path),
                 **{k: v.tolist() for k, v in self.reference.items()}}) + "\n")

    def _stored_reference(self) -> dict[str, torch.Tensor] | None:
        """The reference numbers a resumed run stored, when they are for these pairs and this source."""
        path = self.run_dir / REFERENCE_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != self._fingerprint():
            return None
        self.log(f"dpo: reference log-probabilities from {path}")
        return {k: torch.tensor(saved[k], dtype=torch.float64, device=self.device) for k in ("sums", "counts")}

    @torch.no_grad()
    def _score_reference(self) -> dict[str, torch.Tensor]:
        """Summed log-probabilities and token counts of every pair's chosen and rejected response under the
        source model ([pairs, 2] each, on the device)."""
        self.log("dpo: scoring every pair with the reference (source) model once ...")
        sums, counts = [], []
        self.model.eval()
        for rows in (self.train_rows, self.val_rows):
            n = len(rows["input_ids"])
            for first in range(0, n, self.cfg.data.batch_size):
                batch = self._to_device({k: torch.from_numpy(v[first:first + self.cfg.data.batch_size])
                                         for k, v in rows.items()})
                s, c = sequence_logps(self._logits(batch), batch["labels"], batch["doc_ids"])
                sums.append(s.double())
                counts.append(c.double())
        self.model.train()
        return {"sums": torch.cat(sums), "counts": torch.cat(counts)}

    def _reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_model is not None:
            with torch.no_grad():
                s, c = sequence_logps(self._logits(batch, self.reference_model), batch["labels"], batch["doc_ids"])
            return s.double(), c.double()
        idx = batch["pair_index"]
        return self.reference["sums"][idx], self.reference["counts"][idx]

    # -- the loss ------------------------------------------------------------------------------------
    def _pair_terms(self, batch: dict, model=None) -> torch.Tensor:
        """Per-pair DPO losses of a batch (0 for pairs without scored tokens, i.e. validation filler, weighted
        out rather than dropped: a boolean index would wait for the device); adds the batch's metric sums to
        ``self._sums``."""
        loss_type, beta = self.cfg.dpo.loss, self.cfg.dpo.beta
        sums, counts = sequence_logps(self._logits(batch, model), batch["labels"], batch["doc_ids"])
        ref_sums, ref_counts = self._reference_logps(batch)
        valid = (counts > 0).all(-1)
        w = valid.to(sums.dtype)
        pi = response_logps(sums, counts, loss_type)
        ref = response_logps(ref_sums, ref_counts, loss_type).to(pi.dtype)
        losses, chosen_r, rejected_r = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta)
        losses = losses * w
        stats = torch.stack([x.double() for x in (
            losses.detach().sum(), ((chosen_r > rejected_r) & valid).sum(), ((chosen_r - rejected_r) * w).sum(),
            (chosen_r * w).sum(), (rejected_r * w).sum(), valid.sum(), -(sums[:, 0].detach() * w).sum(),
            (counts[:, 0] * valid).sum(), (batch["chosen_bytes"] * valid).sum())])
        self._sums = stats if self._sums is None else self._sums + stats
        return losses

    def _loss(self, batch: dict, norm: float | torch.Tensor, model=None):
        """``(mean loss share of this micro-batch, summed loss, 0)``: the trainer's token normaliser ``norm``
        is not used; the loss is divided by the pairs this rank sees in a step."""
        losses = self._pair_terms(batch, model)
        pairs = self.cfg.data.batch_size * self.cfg.trainer.grad_accum
        zero = torch.zeros((), device=losses.device)
        return losses.sum() / pairs, losses.detach().sum(), zero

    def train_step(self) -> StepOutput:
        """The trainer's step, its loss the mean over the step's pairs and the reward metrics beside it, all
        left on the device (an all-reduce under FSDP, no host read)."""
        self._sums = None
        out = super().train_step()
        metrics = _metrics(all_reduce(self._sums, self.env))
        out.loss = metrics.pop("loss")
        out.extra = metrics
        return out

    def validate(self, max_batches: int | None = None) -> DPOValResult:
        self._sums = None
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in self._val_batches(max_batches):
                    self._pair_terms(self._to_device(batch), self.model)
        finally:
            self.model.train()
        sums = all_reduce(self._sums, self.env)
        means = {**_metrics(sums), "pairs": sums[STATS.index("pairs")]}
        metrics = dict(zip(means, torch.stack(list(means.values())).tolist()))  # one read-back
        return DPOValResult(loss=metrics["loss"], tokens=int(metrics["pairs"]), stats=metrics)

    def _val_record(self, val: DPOValResult) -> dict:
        m = val.stats
        return {"val_loss": val.loss, "val_bpb": m["chosen_bpb"],
                **{f"val_{k}": m[k] for k in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")}}


def run_dpo(cfg, source: str | Path, run_dir: str | Path, resume: bool = False, log=print, overwrite: bool = False):
    """DPO of ``source`` on the pairs of ``cfg.data.path`` into ``run_dir``; returns the ``TrainResult``."""
    trainer = start(DPOTrainer, cfg, source, run_dir, resume, log, overwrite)
    result = trainer.fit()
    last = read_metrics(trainer.run_dir / "metrics.jsonl")[-1]
    trainer.log(f"validation: DPO loss {last['val_loss']:.4f}, reward accuracy {last['val_reward_accuracy']:.1%}, "
                f"margin {last['val_reward_margin']:.3f} (chosen {last['val_chosen_reward']:.3f}, rejected "
                f"{last['val_rejected_reward']:.3f})")
    return result
