"""DPO on the project's trainer: one preference pair per row (chosen, then rejected, then padding), the
sigmoid ``dpo`` or length-normalised ``dpo_norm`` loss against a frozen reference, reward accuracy and
margins in every step's metrics and every validation.

The reference is the source model. ``dpo.reference=precomputed`` (default) scores every pair with it once,
before the first step, and keeps only those numbers (``RUN/dpo_reference.json``, reused on resume), so no
second model is held in memory; ``dpo.reference=model`` keeps a frozen copy and scores each batch with it.
Both give the same loss.

The loss of a step is the mean over its pairs (``data.batch_size`` per micro-batch x ``trainer.grad_accum``
x ranks). Metrics per step and per validation: ``loss``, ``reward_accuracy`` (chosen reward > rejected),
``reward_margin``, ``chosen_reward``, ``rejected_reward`` (means; rewards are beta * (policy - reference)
log-probabilities, normalised like the loss); a validation's ``val_bpb`` is the policy's bits per byte on the
chosen responses.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from olmo_hybrid.config import ConfigError
from olmo_hybrid.fsio import atomic_write_text
from olmo_hybrid.posttrain.examples import tokenize_pairs
from olmo_hybrid.posttrain.losses import dpo_loss, response_logps, sequence_logps
from olmo_hybrid.posttrain.packing import build_rows
from olmo_hybrid.posttrain.trainer import PostTrainer
from olmo_hybrid.train.distributed import all_reduce
from olmo_hybrid.train.loss import ValResult
from olmo_hybrid.train.metrics import read_metrics

REFERENCE_FILE = "dpo_reference.json"
# Per-step sums: loss, correct, margin, chosen reward, rejected reward, pairs, chosen nats, chosen tokens, chosen bytes
STATS = ("loss", "correct", "margin", "chosen_reward", "rejected_reward", "pairs", "chosen_nats", "chosen_tokens",
         "chosen_bytes")


@dataclass
class DPOValResult(ValResult):
    stats: dict | None = None


def _metrics(sums: torch.Tensor) -> dict:
    s = dict(zip(STATS, sums.tolist()))
    n = max(s["pairs"], 1.0)
    return {"loss": s["loss"] / n, "reward_accuracy": s["correct"] / n, "reward_margin": s["margin"] / n,
            "chosen_reward": s["chosen_reward"] / n, "rejected_reward": s["rejected_reward"] / n,
            "chosen_bpb": s["chosen_nats"] / math.log(2) / max(s["chosen_bytes"], 1.0)}


class DPOTrainer(PostTrainer):
    what = "pairs"

    def __init__(self, cfg, run_dir, source, resume: bool = False, log=print):
        super().__init__(cfg, run_dir, source, resume=resume, log=log)
        self._sums = None
        self.reference_model = None
        if cfg.dpo.reference == "model":
            from olmo_hybrid.model import HybridLM

            self.reference_model = HybridLM(cfg.model, init=False)
            self.reference_model.load_state_dict(source.state_dict)
            self.reference_model.to(self.device).eval().requires_grad_(False)
        else:
            self.reference = self._precomputed_reference()

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

    @torch.no_grad()
    def _precomputed_reference(self) -> dict[str, torch.Tensor]:
        """Summed log-probabilities and token counts of every pair's chosen and rejected response under the
        source model ([pairs, 2] each), computed once and stored in the run directory."""
        path, fingerprint = self.run_dir / REFERENCE_FILE, self._fingerprint()
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == fingerprint:
                self.log(f"dpo: reference log-probabilities from {path}")
                return {k: torch.tensor(saved[k], dtype=torch.float64) for k in ("sums", "counts")}
        self.log("dpo: scoring every pair with the reference (source) model once ...")
        sums, counts = [], []
        self.model.eval()
        for rows in (self.train_rows, self.val_rows):
            n = len(rows["input_ids"])
            for start in range(0, n, self.cfg.data.batch_size):
                batch = self._to_device({k: torch.from_numpy(v[start:start + self.cfg.data.batch_size])
                                         for k, v in rows.items()})
                s, c = sequence_logps(self._logits(batch), batch["labels"], batch["doc_ids"])
                sums.append(s.double().cpu())
                counts.append(c.double().cpu())
        self.model.train()
        ref = {"sums": torch.cat(sums), "counts": torch.cat(counts)}
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "source": str(self.source.path),
                                                **{k: v.tolist() for k, v in ref.items()}}) + "\n")
        return ref

    def _reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_model is not None:
            with torch.no_grad():
                s, c = sequence_logps(self._logits(batch, self.reference_model), batch["labels"], batch["doc_ids"])
            return s.double(), c.double()
        idx = batch["pair_index"].cpu()
        return self.reference["sums"][idx].to(self.device), self.reference["counts"][idx].to(self.device)

    # -- the loss ------------------------------------------------------------------------------------
    def _pair_terms(self, batch: dict, model=None) -> torch.Tensor:
        """Per-pair DPO losses of a batch (pairs without scored tokens, i.e. validation filler, dropped);
        adds the batch's metric sums to ``self._sums``."""
        loss_type, beta = self.cfg.dpo.loss, self.cfg.dpo.beta
        sums, counts = sequence_logps(self._logits(batch, model), batch["labels"], batch["doc_ids"])
        ref_sums, ref_counts = self._reference_logps(batch)
        valid = (counts > 0).all(-1)
        pi = response_logps(sums, counts, loss_type)[valid]
        ref = response_logps(ref_sums, ref_counts, loss_type)[valid].to(pi.dtype)
        losses, chosen_r, rejected_r = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta)
        stats = torch.stack([x.double() for x in (
            losses.detach().sum(), (chosen_r > rejected_r).sum(), (chosen_r - rejected_r).sum(), chosen_r.sum(),
            rejected_r.sum(), valid.sum(), -sums[valid, 0].detach().sum(), counts[valid, 0].sum(),
            batch["chosen_bytes"][valid].sum())])
        self._sums = stats if self._sums is None else self._sums + stats
        return losses

    def _loss(self, batch: dict, norm: float, model=None):
        """``(mean loss share of this micro-batch, summed loss, 0)``: the trainer's token normaliser ``norm``
        is not used; the loss is divided by the pairs this rank sees in a step."""
        losses = self._pair_terms(batch, model)
        pairs = self.cfg.data.batch_size * self.cfg.trainer.grad_accum
        zero = torch.zeros((), device=losses.device)
        return losses.sum() / pairs, losses.detach().sum(), zero

    def train_step(self) -> dict:
        self._sums = None
        record = super().train_step()
        record.update(_metrics(all_reduce(self._sums, self.env)))
        return record

    def validate(self, max_batches: int | None = None) -> DPOValResult:
        self._sums = None
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in self._val_batches(max_batches):
                    self._pair_terms(self._to_device(batch), self.model)
        finally:
            self.model.train()
        metrics = _metrics(all_reduce(self._sums, self.env))
        return DPOValResult(loss=metrics["loss"], tokens=int(self._sums[STATS.index("pairs")]), stats=metrics)

    def _val_record(self, val: DPOValResult) -> dict:
        m = val.stats
        return {"val_loss": val.loss, "val_bpb": m["chosen_bpb"],
                **{f"val_{k}": m[k] for k in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")}}


def run_dpo(cfg, source: str | Path, run_dir: str | Path, resume: bool = False, log=print):
    """DPO of ``source`` on the pairs of ``cfg.data.path`` into ``run_dir``; returns the ``TrainResult``."""
    from olmo_hybrid.posttrain.config import with_source_model
    from olmo_hybrid.posttrain.source import prepare_source

    src = prepare_source(source, cfg.chat.template, log)
    trainer = DPOTrainer(with_source_model(cfg, src.config), run_dir, src, resume=resume, log=log)
    result = trainer.fit()
    last = read_metrics(trainer.run_dir / "metrics.jsonl")[-1]
    trainer.log(f"validation: DPO loss {last['val_loss']:.4f}, reward accuracy {last['val_reward_accuracy']:.1%}, "
                f"margin {last['val_reward_margin']:.3f} (chosen {last['val_chosen_reward']:.3f}, rejected "
                f"{last['val_rejected_reward']:.3f})")
    return result
