"""From a results file to fitted laws, token savings and a rollout check (``olmo-hybrid scaling fit``).

Every architecture whose points determine the law (3 or more sizes, 5 or more distinct points, 2 or more
budgets: ``law.design_problem``; others are skipped with a warning) gets its own law (``law.fit_law``) and a
bootstrap of it. A point repeated in the file counts once (``results.unique_points``).
Token savings against a reference architecture at a target loss L* and size N is the ratio
D_reference(N, L*) / D_arch(N, L*) of the tokens each law needs, with a percentile interval from paired
bootstrap samples (sample i of one law with sample i of the other). The rollout check fits each
architecture with 4 or more sizes on all but its largest size and reports how well that law predicts the
largest size's losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from olmo_hybrid.errors import ConfigError
from olmo_hybrid.scaling.law import (MIN_SIZES, PARAMS, TOP_K, FitError, Law, bootstrap_laws, design_problem,
                                     fit_law, interval)
from olmo_hybrid.scaling.results import ResultsError, check_point, read_results, unique_points

DEFAULT_REFERENCE = "transformer"
DEFAULT_SIZES = (1e9, 7e9, 70e9)


@dataclass
class FitOptions:
    reference: str | None = None  # None: "transformer" when the results have it
    target_loss: float | None = None  # None: the median observed loss of the fitted architectures
    sizes: list[float] | None = None  # None: 1e9, 7e9, 70e9 and the largest size run
    bootstrap: int = 100
    seed: int = 0
    top_k: int = TOP_K
    level: float = 0.95


@dataclass
class ArchData:
    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray

    @property
    def sizes(self) -> list[float]:
        return sorted({float(x) for x in self.n})


@dataclass
class Analysis:
    data: dict[str, ArchData]
    laws: dict[str, Law] = field(default_factory=dict)
    boot: dict[str, list[Law]] = field(default_factory=dict)
    reference: str | None = None
    target_loss: float | None = None
    sizes: list[float] = field(default_factory=list)
    level: float = 0.95
    fit_json: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def ratio_samples(self, arch: str, n) -> tuple[np.ndarray, np.ndarray]:
        """The ratio D_reference / D_arch at sizes ``n`` from the full fits, and from each bootstrap pair
        ([samples, len(n)]); NaN where either law cannot reach the target at that size."""
        ref, law = self.laws[self.reference], self.laws[arch]
        n = np.asarray(n, dtype=float)
        full = ref.tokens_for(self.target_loss, n) / law.tokens_for(self.target_loss, n)
        pairs = zip(self.boot[self.reference], self.boot[arch])
        boot = np.array([r.tokens_for(self.target_loss, n) / a.tokens_for(self.target_loss, n) for r, a in pairs])
        return full, boot.reshape(-1, len(n))


def load_points(path: str | Path, log=print) -> dict[str, ArchData]:
    if not Path(path).is_file():
        raise ResultsError(f"results file {path} does not exist")
    points = read_results(path, log=log)
    if not points:
        raise ResultsError(f"{path} holds no points")
    for p in points:
        check_point(path, p)
    grouped: dict[str, list[tuple[float, float, float]]] = {}
    for p in unique_points(path, points, log=log):
        r = p.record
        grouped.setdefault(r["arch"], []).append((float(r["params_nonemb"]), float(r["tokens"]), float(r["loss"])))
    return {arch: ArchData(*(np.array(col) for col in zip(*rows))) for arch, rows in grouped.items()}


def _none_if_nan(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _rollout(data: ArchData, top_k: int) -> dict:
    """Fit on all sizes but the largest; predict the largest size's points."""
    largest = max(data.n)
    small = data.n < largest
    law = fit_law(data.n[small], data.d[small], data.loss[small], top_k=top_k).law
    pred = law.loss(data.n[~small], data.d[~small])
    rel = (pred - data.loss[~small]) / data.loss[~small]
    return {"fit_sizes": sorted({float(x) for x in data.n[small]}), "predicted_size": float(largest),
            "points": [{"tokens": float(d), "loss": float(obs), "predicted": float(p)}
                       for d, obs, p in zip(data.d[~small], data.loss[~small], pred)],
            "mean_abs_rel_error": float(np.abs(rel).mean()), "max_abs_rel_error": float(np.abs(rel).max()),
            "mean_rel_error": float(rel.mean()), "law": law.as_dict()}


def analyse(path: str | Path, options: FitOptions | None = None, log=print) -> Analysis:
    """Fit every architecture of the results file at ``path``; see the module docstring."""
    o = options or FitOptions()
    for name, values in (("target loss", [] if o.target_loss is None else [o.target_loss]), ("sizes", o.sizes or [])):
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
            raise ConfigError(f"{name} {values}: expected finite positive numbers")
    data = load_points(path, log=log)
    reference = o.reference
    if reference is not None and reference not in data:
        raise ResultsError(f"reference architecture '{reference}' has no points in {path} "
                           f"(architectures there: {', '.join(sorted(data))})")
    if reference is None and DEFAULT_REFERENCE in data:
        reference = DEFAULT_REFERENCE
    skipped = {}
    for arch, d in data.items():
        why = design_problem(d.n, d.d)
        if why:
            if arch == reference:
                raise ResultsError(f"reference architecture '{arch}' has {why}")
            log(f"warning: skipping architecture '{arch}': {why}")
            skipped[arch] = why
    fitted = {a: d for a, d in data.items() if a not in skipped}
    if not fitted:
        raise ResultsError(f"no architecture in {path} can be fitted: {'; '.join(f'{a}: {w}' for a, w in skipped.items())}")
    an = Analysis(data=fitted, reference=reference, level=o.level)
    rng = np.random.default_rng(o.seed)
    details_archs = {}
    for arch, d in fitted.items():
        log(f"fitting {arch}: {len(d.n)} points at {len(d.sizes)} sizes, {o.bootstrap} bootstrap samples")
        try:
            res = fit_law(d.n, d.d, d.loss, top_k=o.top_k)
        except FitError as e:
            raise ResultsError(f"architecture '{arch}': {e}") from e
        an.laws[arch] = res.law
        an.boot[arch] = bootstrap_laws(d.n, d.d, d.loss, res, o.bootstrap, rng)
        resid = np.log(res.law.loss(d.n, d.d)) - np.log(d.loss)
        details_archs[arch] = {"sizes": d.sizes, "points": len(d.n), "objective": res.objective,
                               "rms_log_residual": float(np.sqrt(np.mean(resid ** 2))),
                               "bootstrap_samples": len(an.boot[arch])}
    all_losses = np.concatenate([d.loss for d in fitted.values()])
    an.target_loss = float(o.target_loss) if o.target_loss is not None else float(np.median(all_losses))
    if reference is not None:
        for arch, law in an.laws.items():
            if an.target_loss <= law.E:
                raise ResultsError(
                    f"target loss {an.target_loss:.4f} is at or below architecture '{arch}''s fitted irreducible loss "
                    f"E = {law.E:.4f}: no amount of data reaches it; choose a target above "
                    f"{max(l.E for l in an.laws.values()):.4f}")
    largest_run = float(max(d.n.max() for d in fitted.values()))
    an.sizes = sorted(set(o.sizes) if o.sizes else {largest_run, *DEFAULT_SIZES})
    savings = []
    if reference is None:
        log(f"note: no token savings: no '{DEFAULT_REFERENCE}' in the results and no --reference given")
    else:
        for arch in an.laws:
            if arch == reference:
                continue
            full, boot = an.ratio_samples(arch, an.sizes)
            for j, n in enumerate(an.sizes):
                savings.append({"arch": arch, "reference": reference, "params": n, "target_loss": an.target_loss,
                                "ratio": _none_if_nan(full[j]), "ci": interval(boot[:, j], o.level)})
    an.fit_json = {
        "fits": {arch: {**law.as_dict(),
                        "ci": {k: interval([getattr(b, k) for b in an.boot[arch]], o.level) for k in PARAMS}}
                 for arch, law in an.laws.items()},
        "token_savings": savings,
    }
    rollout = {}
    for arch, d in fitted.items():
        if len(d.sizes) < MIN_SIZES + 1:
            rollout[arch] = {"skipped": f"needs {MIN_SIZES + 1} sizes (fit on {MIN_SIZES}, predict 1), has {len(d.sizes)}"}
            continue
        try:  # FitError: the smaller sizes alone cannot determine the law
            rollout[arch] = _rollout(d, o.top_k)
        except FitError as e:
            rollout[arch] = {"skipped": str(e)}
    an.details = {
        "results": str(path), "reference": reference, "target_loss": an.target_loss,
        "target_loss_source": "given" if o.target_loss is not None else "median observed loss", "sizes": an.sizes,
        "method": {"law": "L = E + A/N^alpha + B/D^beta", "N": "params_nonemb", "D": "tokens",
                   "loss": "Huber (delta 1e-3) on log residuals", "weights": "sqrt(6 N D)",
                   "optimiser": f"L-BFGS-B from the best {o.top_k or 'all'} of a 4^5 start grid",
                   "bootstrap": o.bootstrap, "interval": o.level, "seed": o.seed},
        "architectures": details_archs, "skipped": skipped, "rollout": rollout,
    }
    return an
