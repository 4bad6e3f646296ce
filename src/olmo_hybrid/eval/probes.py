"""Train-short, test-long probe recipes: which architectures learn state tracking and recall.

``python -m olmo_hybrid.eval.probes --task parity --models gdn,gdn-noneg,transformer,hybrid`` trains each
model from scratch on sequences of ``--train-len`` tokens (loss on every scored position) and reports
accuracy at ``--test-lens`` (default 1x, 2x, 4x the training length):

- ``acc_tokens``: accuracy over all scored positions of sequences of that length;
- ``acc_last``: accuracy at the last scored position, i.e. the state after the whole sequence.

The expected separation (Grazzi et al. 2025): Gated DeltaNet with beta in (0, 2) (negative eigenvalues,
``gdn_allow_neg_eigval=True``) learns parity and extends it to 4x the training length; with beta in
(0, 1) it cannot, and a transformer of similar size does not extend past its training length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.eval.probe_tasks import IGNORE, TASKS
from olmo_hybrid.eval.report import plot_score_vs_length, score_by_length_table, write_json_atomic

# name -> (layer pattern, allow negative eigenvalues). All variants share width and depth. "hybrid" is
# OLMo Hybrid's 3:1 interleave ("GGGA") when the depth is a multiple of 4, else 1:1 ("GA").
MODEL_VARIANTS = {
    "gdn": ("G", True),
    "gdn-noneg": ("G", False),
    "hybrid": ("GGGA", True),
    "hybrid-noneg": ("GGGA", False),
    "transformer": ("A", True),
}


@dataclass
class ProbeConfig:
    task: str = "parity"
    train_len: int = 64
    test_lens: list[int] = field(default_factory=list)  # empty: 1x, 2x, 4x train_len
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 100
    d_model: int = 64
    n_layers: int = 2
    heads: int = 2
    eval_batches: int = 4
    seed: int = 0
    device: str = "cpu"

    def lengths(self) -> list[int]:
        return self.test_lens or [self.train_len, 2 * self.train_len, 4 * self.train_len]


def probe_model_config(variant: str, vocab_size: int, cfg: ProbeConfig) -> ModelConfig:
    if variant not in MODEL_VARIANTS:
        raise ValueError(f"unknown probe model '{variant}' (known: {', '.join(MODEL_VARIANTS)})")
    pattern, neg = MODEL_VARIANTS[variant]
    if pattern == "GGGA" and cfg.n_layers % 4:
        pattern = "GA"
    head = cfg.d_model // cfg.heads
    return ModelConfig(
        vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, layer_pattern=pattern,
        n_heads=cfg.heads, gdn_heads=cfg.heads, gdn_head_k=head, gdn_head_v=head, gdn_allow_neg_eigval=neg,
        mlp_hidden=2 * cfg.d_model, rope_theta=10_000.0, max_seq_len=max(cfg.lengths()) + 1,
        tie_embeddings=False,
    )


def _loss(model, ids, labels):
    logits = model(ids)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def train_probe(model: torch.nn.Module, cfg: ProbeConfig, log_every: int = 100, quiet: bool = False) -> list[float]:
    """AdamW with linear warmup and cosine decay; returns the loss of every step."""
    task = TASKS[cfg.task]
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_at(step):
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    losses, start = [], time.time()
    model.train()
    for step in range(cfg.steps):
        ids, labels = task.make(cfg.batch_size, cfg.train_len, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = _loss(model, ids.to(cfg.device), labels.to(cfg.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"probe {cfg.task}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if not quiet and (step % log_every == 0 or step == cfg.steps - 1):
            rate = (step + 1) / (time.time() - start)
            eta = (cfg.steps - step - 1) / rate
            print(f"  step {step:5d} loss {loss.item():.4f} ({rate:.1f} steps/s, ETA {eta:.0f}s)",
                  file=sys.stderr, flush=True)
    return losses


@torch.no_grad()
def evaluate_probe(model: torch.nn.Module, cfg: ProbeConfig) -> dict[int, dict[str, float]]:
    """Accuracy at every test length on fresh sequences (a different seed from training)."""
    task = TASKS[cfg.task]
    gen = torch.Generator().manual_seed(cfg.seed + 10_000)
    model.eval()
    out = {}
    for length in cfg.lengths():
        correct = total = last_correct = last_total = 0
        for _ in range(cfg.eval_batches):
            ids, labels = task.make(cfg.batch_size, length, gen)
            ids, labels = ids.to(cfg.device), labels.to(cfg.device)
            pred = model(ids).argmax(-1)
            scored = labels != IGNORE
            correct += int(((pred == labels) & scored).sum())
            total += int(scored.sum())
            # last scored position of each row
            last = scored.long().cumsum(1).argmax(1)
            rows = torch.arange(ids.shape[0], device=ids.device)
            last_correct += int((pred[rows, last] == labels[rows, last]).sum())
            last_total += ids.shape[0]
        out[length] = {"acc_tokens": 100.0 * correct / total, "acc_last": 100.0 * last_correct / last_total}
    model.train()
    return out


def run_probe(cfg: ProbeConfig, variants: list[str], quiet: bool = False) -> dict:
    from olmo_hybrid.model import HybridLM

    task = TASKS[cfg.task]
    results = {"task": cfg.task, "description": task.description, "config": dataclasses.asdict(cfg),
               "models": {}}
    for variant in variants:
        torch.manual_seed(cfg.seed)
        mcfg = probe_model_config(variant, task.vocab_size, cfg)
        model = HybridLM(mcfg).to(cfg.device)
        if not quiet:
            print(f"[{cfg.task}] {variant}: {mcfg.layer_pattern} x{mcfg.n_layers}, "
                  f"{model.num_params():,} params", file=sys.stderr)
        start = time.time()
        losses = train_probe(model, cfg, quiet=quiet)
        acc = evaluate_probe(model, cfg)
        results["models"][variant] = {
            "layer_pattern": mcfg.layer_pattern, "allow_neg_eigval": mcfg.gdn_allow_neg_eigval,
            "params": model.num_params(), "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "train_seconds": round(time.time() - start, 1),
            "accuracy": {str(n): a for n, a in acc.items()},
        }
        if not quiet:
            print(f"[{cfg.task}] {variant}: " + ", ".join(f"len {n}: last {a['acc_last']:.1f}% tokens "
                  f"{a['acc_tokens']:.1f}%" for n, a in acc.items()), file=sys.stderr)
    return results


def probe_checkpoint(model: torch.nn.Module, cfg: ProbeConfig, quiet: bool = False) -> dict:
    """Fine-tune a copy of a trained model on a probe (its ids are a prefix of the model's vocabulary)
    and report accuracy by length: how well this checkpoint's architecture and weights pick the task up."""
    import copy

    task = TASKS[cfg.task]
    mcfg = model.config
    if task.vocab_size > mcfg.vocab_size:
        raise ValueError(f"probe {cfg.task} needs {task.vocab_size} token ids; the model has {mcfg.vocab_size}")
    if mcfg.n_attn_layers and max(cfg.lengths()) > mcfg.max_seq_len:
        raise ValueError(f"probe test length {max(cfg.lengths())} exceeds the model's max_seq_len={mcfg.max_seq_len}")
    tuned = copy.deepcopy(model).to(cfg.device)
    start = time.time()
    losses = train_probe(tuned, cfg, quiet=quiet)
    acc = evaluate_probe(tuned, cfg)
    return {"task": cfg.task, "description": task.description, "config": dataclasses.asdict(cfg),
            "models": {"checkpoint": {"layer_pattern": mcfg.layer_pattern,
                                      "allow_neg_eigval": mcfg.gdn_allow_neg_eigval,
                                      "params": sum(p.numel() for p in tuned.parameters()),
                                      "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                                      "train_seconds": round(time.time() - start, 1),
                                      "accuracy": {str(n): a for n, a in acc.items()}}}}


def primary_metric(task: str) -> str:
    """State tracking is judged by the final state; MQAR by all queries (Zoology's accuracy)."""
    return "acc_tokens" if task == "mqar" else "acc_last"


def results_table(results: dict, metric: str | None = None) -> str:
    metric = metric or primary_metric(results["task"])
    scores = {v: {int(n): a[metric] for n, a in r["accuracy"].items()} for v, r in results["models"].items()}
    return score_by_length_table(scores, first="model")


def save_probe_results(results: dict, out_dir: str | Path, plot: bool = True) -> Path:
    out = Path(out_dir)
    path = write_json_atomic(out / f"{results['task']}.json", results)
    if plot:
        metric = primary_metric(results["task"])
        scores = {v: {int(n): a[metric] for n, a in r["accuracy"].items()} for v, r in results["models"].items()}
        ylabel = "accuracy over all queries (%)" if metric == "acc_tokens" else "accuracy at last position (%)"
        plot_score_vs_length(scores, out / f"{results['task']}.png",
                             f"{results['task']}: trained at length {results['config']['train_len']}", ylabel)
    return path


def merge_results(paths: list[str | Path]) -> list[dict]:
    """Combine per-model result files (runs split across processes) into one result per task."""
    merged: dict[str, dict] = {}
    for path in paths:
        res = json.loads(Path(path).read_text())
        if res.get("task") not in TASKS or "models" not in res:
            raise ValueError(f"{path} is not a probe result file (needs 'task' and 'models')")
        if res["task"] not in merged:
            merged[res["task"]] = {k: v for k, v in res.items() if k != "models"} | {"models": {}, "configs": {}}
        target = merged[res["task"]]
        for variant, r in res["models"].items():
            target["models"][variant] = r
            target["configs"][variant] = res["config"]  # runs may differ in steps or learning rate
    return list(merged.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m olmo_hybrid.eval.probes", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="parity")
    p.add_argument("--models", default="gdn,gdn-noneg,hybrid,transformer",
                   help=f"comma-separated, from {', '.join(MODEL_VARIANTS)}")
    p.add_argument("--out", default="runs/probes", help="directory for <task>.json and <task>.png (the committed "
                   "results in docs/probes are rewritten only when named)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge per-model result files into --out and exit")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (tiny models gain nothing from more; 0: torch default)")
    p.add_argument("--ops-backend", default="torch", help="GDN ops backend: torch (exact reference), auto, triton")
    for f in dataclasses.fields(ProbeConfig):
        if f.name == "task":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "test_lens":
            p.add_argument(flag, type=lambda s: [int(x) for x in s.split(",")], default=[])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    if args.merge:
        for res in merge_results(args.merge):
            path = save_probe_results(res, args.out, plot=not args.no_plot)
            print(f"{res['task']}\n{results_table(res)}\nresults: {path}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from olmo_hybrid import ops

    cfg = ProbeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ProbeConfig)})
    variants = [v.strip() for v in args.models.split(",") if v.strip()]
    for v in variants:
        if v not in MODEL_VARIANTS:
            p.error(f"unknown model '{v}' (known: {', '.join(MODEL_VARIANTS)})")
    with ops.use_backend(args.ops_backend):
        results = run_probe(cfg, variants)
    path = save_probe_results(results, args.out, plot=not args.no_plot)
    print(results_table(results))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
