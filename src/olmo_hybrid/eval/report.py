"""Writing evaluation results: atomic JSON, markdown tables, and score-vs-length plots (matplotlib optional)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from olmo_hybrid.errors import WriteError
from olmo_hybrid.fsio import atomic_write_text, failure_reason


def write_json_atomic(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table; floats printed with 1 decimal (scores are percentages)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def score_by_length_table(scores: dict[str, dict[int, float]], first: str = "task") -> str:
    """``{name: {length: score}}`` -> table with one row per name and one column per length."""
    lengths = sorted({int(n) for per in scores.values() for n in per})
    rows = [{first: name, **{str(n): per.get(n, per.get(str(n))) for n in lengths}} for name, per in scores.items()]
    return markdown_table(rows, [first] + [str(n) for n in lengths])


def plot_score_vs_length(scores: dict[str, dict[int, float]], path: str | Path, title: str,
                         ylabel: str = "score", highlight: str | None = None) -> Path | None:
    """Line plot, one line per name; returns None (and says why) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'olmo-hybrid[plot]'); skipping the plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per in scores.items():
        xs = sorted(int(n) for n in per)
        ys = [per.get(n, per.get(str(n))) for n in xs]
        bold = name == highlight
        ax.plot(xs, ys, marker="o", linewidth=3 if bold else 1.2, label=name, color="black" if bold else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write {path}: {failure_reason(e)}") from e
    finally:
        plt.close(fig)
    return path
