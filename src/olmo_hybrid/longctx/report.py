"""The experiment's tables and curves, from its results file into a marked section of ``docs/long_context.md``.

Only what the results file holds is written: RULER averages per model and length (mean over seeds, with the
range when there are several), the table at the longest length beside the paper's RULER at 64k (8x its 8,192
original length), the per-task scores there, the training runs, and the measured time per kind of piece with the
devices, versions and dates. The section between the markers is replaced whole (atomically); the prose around it,
the reading of the numbers, is written by hand.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from olmo_hybrid.errors import ConfigError, DataError
from olmo_hybrid.eval.report import markdown_table, plot_score_vs_length
from olmo_hybrid.fsio import atomic_write_text, read_jsonl
from olmo_hybrid.longctx.experiment import NO_EXTENSION, PAPER_8X, ExperimentConfig

BEGIN = "<!-- longctx-experiment:begin -->"
END = "<!-- longctx-experiment:end -->"
PLOT = "long_context_ruler.png"
METHOD_NAMES = {"drope": "DRoPE", "yarn": "YaRN", "none": "RoPE, trained long"}


def model_label(arch: str, method: str) -> str:
    return f"{arch}, no extension" if method == NO_EXTENSION else f"{arch} + {METHOD_NAMES.get(method, method)}"


def _mean(values: list[float]) -> str:
    if not values:
        return ""
    m = statistics.fmean(values)
    return f"{m:.1f}" if len(values) == 1 else f"{m:.1f} ({min(values):.1f}-{max(values):.1f})"


def build_section(cfg: ExperimentConfig, records: list[dict], plot_path: Path | None) -> str:
    """The generated markdown between the markers."""
    ruler = [r for r in records if r.get("kind") == "ruler"]
    training = [r for r in records if r.get("kind") in ("train", "extend")]
    source = f"`{cfg.results}`"
    if not ruler and not training:
        return f"No results yet: `olmo-hybrid longctx-experiment CONFIG` appends them to {source}."
    averages = _averages(records)
    per_task: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[tuple, set] = defaultdict(set)
    lengths = sorted({r["length"] for r in ruler})
    longest = lengths[-1] if lengths else None
    for r in ruler:
        seeds[(r["arch"], r["method"])].add(r["seed"])
        if r["length"] == longest:
            for task, score in r["scores"].items():
                per_task[(r["arch"], r["method"])][task].append(score)
    models = sorted(seeds, key=lambda m: (m[0], m[1] != NO_EXTENSION, m[1]))

    def average(model: tuple, length: int) -> str:
        return _mean(averages.get((*model, length), []))

    parts = [f"Generated from {source} ({len(records)} records); RULER: {cfg.ruler.samples} samples per task and "
             f"length, tasks {', '.join(cfg.ruler.tasks)}, greedy answers of at most {cfg.ruler.max_new_tokens} tokens; "
             f"ranges are over seeds."]
    if longest is not None:
        rows = [{"model": model_label(*m), f"ours at {longest:,}": average(m, longest),
                 "seeds": len(seeds[m]), "paper at 64k": PAPER_8X.get(m, "")} for m in models]
        parts.append(f"### RULER average at the longest length ({longest:,} tokens)\n\n"
                     + markdown_table(rows, ["model", f"ours at {longest:,}", "seeds", "paper at 64k"]))
        rows = [{"model": model_label(*m), **{f"{n:,}": average(m, n) for n in lengths}}
                for m in models]
        parts.append("### RULER average by length\n\n" + markdown_table(rows, ["model"] + [f"{n:,}" for n in lengths]))
        tasks = list(dict.fromkeys(t for m in models for t in per_task[m]))
        rows = [{"task": t, **{model_label(*m): _mean(per_task[m].get(t, [])) for m in models}} for t in tasks]
        parts.append(f"### Per task at {longest:,} tokens\n\n"
                     + markdown_table(rows, ["task"] + [model_label(*m) for m in models]))
        skipped = sorted({f"{t} at {r['length']:,}" for r in ruler for t in r.get("skipped", {})})
        if skipped:
            parts.append("Skipped (could not be built at that length; averages cover the tasks scored): "
                         + ", ".join(skipped) + ".")
    if training:
        rows = [{"run": r["key"], "tokens": f"{r['tokens']:,}", "seq_len": r["seq_len"],
                 "val loss": f"{r['val_loss']:.3f}" if r.get("val_loss") is not None else "",
                 "tokens/s": f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "",
                 "minutes": f"{r['wall_s'] / 60:.1f}"} for r in training]
        parts.append("### Training runs\n\n" + markdown_table(rows, ["run", "tokens", "seq_len", "val loss",
                                                                     "tokens/s", "minutes"]))
    minutes = defaultdict(float)
    for r in records:
        minutes[r.get("kind", "?")] += r.get("wall_s", 0.0) / 60
    devices = sorted({r.get("device", "?") for r in records})
    versions = sorted({f"torch {r.get('torch', '?')}, Triton {r.get('triton', '-')}" for r in records})
    dates = sorted({r.get("date", "?") for r in records})
    parts.append(f"Time: {', '.join(f'{k} {v:.1f} min' for k, v in minutes.items())} "
                 f"(total {sum(minutes.values()):.1f} min) on {', '.join(devices)}; {'; '.join(versions)}; "
                 f"{dates[0]} to {dates[-1]}.")
    if plot_path is not None:
        parts.append(f"![RULER average vs length]({plot_path.name})")
    return "\n\n".join(parts)


def write_report(cfg: ExperimentConfig, log=print) -> Path:
    """Replace the section between the markers of ``cfg.docs`` with the tables (and the plot beside it)."""
    docs = Path(cfg.docs)
    if not docs.is_file():
        raise ConfigError(f"docs: {docs} does not exist (it holds the experiment's section between {BEGIN} and {END})")
    text = docs.read_text()
    if BEGIN not in text or END not in text:
        raise DataError(f"{docs} has no {BEGIN} ... {END} section to write the experiment's results into")
    records = [r for _, r in read_jsonl(cfg.results, log=log, error=DataError)]
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    for (arch, method, length), values in _averages(records).items():
        curves[model_label(arch, method)][length] = statistics.fmean(values)
    plot = plot_score_vs_length(dict(curves), docs.parent / PLOT, "RULER average vs length (mean over seeds)",
                                "RULER average (%)") if curves else None
    section = build_section(cfg, records, plot)
    head, rest = text.split(BEGIN, 1)
    atomic_write_text(docs, f"{head}{BEGIN}\n{section}\n{END}{rest.split(END, 1)[1]}")
    log(f"[longctx] wrote the results section of {docs}" + (f" and {docs.parent / PLOT}" if plot else ""))
    return docs


def _averages(records: list[dict]) -> dict[tuple, list[float]]:
    out: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "ruler" and r.get("average") is not None:
            out[(r["arch"], r["method"], r["length"])].append(r["average"])
    return out
