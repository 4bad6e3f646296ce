"""Figures of a fit (matplotlib, the ``scaling`` extra, imported here only).

* ``loss_vs_tokens.png``: one panel per architecture, the observed points of each size and the fitted law's
  curve at that size.
* ``token_savings.png``: D_reference / D_arch at the target loss against N, the full fit as a line and the
  bootstrap percentile interval as a band; the sizes actually run are shaded.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from olmo_hybrid.scaling.fit import Analysis


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib (the 'scaling' extra)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def plot_loss_vs_tokens(an: Analysis, path: str | Path) -> Path:
    plt = _pyplot()
    archs = list(an.laws)
    cols = min(2, len(archs))
    rows = math.ceil(len(archs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    for ax, arch in zip(axes.flat, archs):
        data, law = an.data[arch], an.laws[arch]
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(data.sizes)))
        for color, n in zip(colors, data.sizes):
            mine = data.n == n
            ax.scatter(data.d[mine], data.loss[mine], color=color, zorder=3, label=f"N={_fmt_params(n)}")
            grid = np.geomspace(data.d[mine].min() / 1.5, data.d[mine].max() * 1.5, 100)
            ax.plot(grid, law.loss(n, grid), color=color, lw=1.2)
        ax.set_xscale("log")
        ax.set_xlabel("tokens D")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{arch}: E={law.E:.3f} A={law.A:.3g} a={law.alpha:.3f} B={law.B:.3g} b={law.beta:.3f}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(archs):]:
        ax.set_visible(False)
    return _save(plt, fig, path)


def plot_token_savings(an: Analysis, path: str | Path) -> Path:
    plt = _pyplot()
    others = [a for a in an.laws if a != an.reference]
    run_sizes = np.concatenate([d.n for d in an.data.values()])
    grid = np.geomspace(run_sizes.min(), max(max(an.sizes), run_sizes.max()), 80)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arch in others:
        full, boot = an.ratio_samples(arch, grid)
        (line,) = ax.plot(grid, full, label=f"{arch} vs {an.reference}")
        if len(boot):
            with warnings.catch_warnings():  # all-NaN columns (target unreachable there) leave gaps
                warnings.simplefilter("ignore", RuntimeWarning)
                tail = 50 * (1 - an.level)
                lo, hi = np.nanpercentile(boot, [tail, 100 - tail], axis=0)
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2)
    ax.axvspan(run_sizes.min(), run_sizes.max(), color="grey", alpha=0.1, label="sizes run")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(f"D_{an.reference} / D_arch")
    ax.set_title(f"token savings at loss {an.target_loss:.3f} ({100 * an.level:g}% bootstrap band)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)



def _save(plt, fig, path: str | Path) -> Path:
    """Write the figure next to ``path`` and rename it into place (a killed process leaves no half image)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
