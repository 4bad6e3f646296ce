"""The Chinchilla law L(N, D) = E + A / N^alpha + B / D^beta and its fit (approach 3 of Hoffmann et al.).

The fit follows the recipe of the OLMo Hybrid scaling study (docs/scaling.md): a Huber loss (delta 1e-3) on
the log residuals log L_fit - log L_observed, each point weighted by sqrt(6 N D) (larger runs count more),
minimised by L-BFGS-B within bounds E in [0, min L], A, B in [1e-6, 1e4], alpha, beta in [0.01, 2] from a
grid of starting points, keeping the best optimum. A and B are optimised as their logarithms (same bounds),
which keeps the problem well scaled. scipy is imported here only (the ``scaling`` extra).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

PARAMS = ("E", "A", "alpha", "B", "beta")
HUBER_DELTA = 1e-3
COEF_BOUNDS = (1e-6, 1e4)  # A and B
EXP_BOUNDS = (0.01, 2.0)  # alpha and beta
# The start grid: 4 values per parameter (4^5 = 1024 starts). E as fractions of the smallest observed loss.
GRID = {
    "E": (0.125, 0.375, 0.625, 0.875),
    "log_A": (-3.0, 1.5, 5.0, 8.5),
    "alpha": (0.1, 0.3, 0.6, 1.2),
    "log_B": (-3.0, 1.5, 5.0, 8.5),
    "beta": (0.1, 0.3, 0.6, 1.2),
}
TOP_K = 64  # grid points L-BFGS-B starts from (the best by the objective at the start)
MIN_SIZES = 3  # distinct N a fit needs (and 5 distinct (N, D) points: one per parameter)


class FitError(ValueError):
    """The points cannot be fitted (too few, non-positive, or the optimiser found nothing finite)."""


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, n, d):
        """Predicted loss at ``n`` non-embedding parameters and ``d`` tokens (arrays broadcast)."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta

    def tokens_for(self, target_loss: float, n):
        """Tokens a model of ``n`` parameters needs to reach ``target_loss``: (B / (L - E - A/N^alpha))^(1/beta).
        NaN where the target is at or below what infinite data gives at that size."""
        gap = target_loss - self.E - self.A * np.asarray(n, dtype=float) ** -self.alpha
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > 0, (self.B / np.where(gap > 0, gap, 1.0)) ** (1.0 / self.beta), np.nan)

    def as_dict(self) -> dict:
        return {k: float(getattr(self, k)) for k in PARAMS}


@dataclass
class FitResult:
    law: Law
    objective: float
    optima: list[np.ndarray]  # distinct local optima (internal parameters), best first: bootstrap starts


def _objective(theta: np.ndarray, log_n, log_d, log_l, weights, delta: float) -> tuple[float, np.ndarray]:
    """Weighted Huber loss of the log residuals and its gradient in (E, logA, alpha, logB, beta), divided by
    delta^2 so that a residual of a few delta costs O(1) (the optimiser's tolerances are then meaningful)."""
    e, log_a, alpha, log_b, beta = theta
    term_n = np.exp(log_a - alpha * log_n)
    term_d = np.exp(log_b - beta * log_d)
    pred = e + term_n + term_d
    r = np.log(pred) - log_l
    small = np.abs(r) <= delta
    huber = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)) / delta**2
    dh = np.where(small, r, delta * np.sign(r)) / delta**2 * weights / pred
    grad = np.array([dh.sum(), (dh * term_n).sum(), -(dh * term_n * log_n).sum(),
                     (dh * term_d).sum(), -(dh * term_d * log_d).sum()])
    return float((weights * huber).sum()), grad


def _bounds(min_loss: float) -> list[tuple[float, float]]:
    log_coef = (math.log(COEF_BOUNDS[0]), math.log(COEF_BOUNDS[1]))
    return [(0.0, min_loss), log_coef, EXP_BOUNDS, log_coef, EXP_BOUNDS]


def _theta_to_law(theta: np.ndarray) -> Law:
    return Law(float(theta[0]), float(math.exp(theta[1])), float(theta[2]), float(math.exp(theta[3])), float(theta[4]))


def grid_starts(min_loss: float) -> np.ndarray:
    """The 4^5 starting points (internal parameters)."""
    return np.array([(e * min_loss, la, a, lb, b) for e, la, a, lb, b in itertools.product(*GRID.values())])


def check_points(n, d, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    if not (n.shape == d.shape == loss.shape) or n.ndim != 1:
        raise FitError(f"N, D and L must be 1-D arrays of one length, got shapes {n.shape}, {d.shape}, {loss.shape}")
    if len(n) < 5:
        raise FitError(f"{len(n)} points cannot determine 5 parameters")
    for name, x in (("N", n), ("D", d), ("loss", loss)):
        if not (np.isfinite(x).all() and (x > 0).all()):
            raise FitError(f"every {name} must be finite and positive")
    problem = design_problem(n, d)
    if problem:
        raise FitError(problem)
    return n, d, loss


def design_problem(n, d) -> str | None:
    """Why points at these (N, D) cannot determine the law, or None. Besides too few sizes or points: when
    log D is an affine function of log N (one tokens-per-parameter ratio, i.e. a single budget, or one D for
    every size) the data term B/D^beta cannot be told apart from the size term A/N^alpha, and any split of
    the loss between them fits equally well: the token savings would be arbitrary."""
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    sizes = len(set(n.tolist()))
    if sizes < MIN_SIZES:
        return f"points at {sizes} size(s); a fit needs at least {MIN_SIZES}"
    distinct = len(set(zip(n.tolist(), d.tolist())))
    if distinct < len(PARAMS):
        return f"{distinct} distinct (params, tokens) points; a fit needs at least {len(PARAMS)}"
    design = np.stack([np.log(n), np.log(d)], axis=1)
    s = np.linalg.svd(design - design.mean(axis=0), compute_uv=False)
    if s[1] <= 1e-9 * s[0]:
        return ("the tokens are a fixed power of the size at every point (e.g. a single budget): the data term "
                "cannot be told apart from the size term; a fit needs at least 2 budgets")
    return None


def fit_law(n, d, loss, starts: np.ndarray | None = None, top_k: int = TOP_K, delta: float = HUBER_DELTA) -> FitResult:
    """Fit the law to points (N, D, L); the best optimum wins.

    Without ``starts``: the objective is evaluated at all 4^5 grid points and L-BFGS-B runs from the
    ``top_k`` best of them (0: from every one; about 50x slower for the same optimum in our checks).
    """
    from scipy.optimize import minimize

    n, d, loss = check_points(n, d, loss)
    weights = np.sqrt(6.0 * n * d)
    weights = weights / weights.mean()
    args = (np.log(n), np.log(d), np.log(loss), weights, delta)
    bounds = _bounds(float(loss.min()))
    lo, hi = np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])
    if starts is None:
        starts = grid_starts(float(loss.min()))
        if 0 < top_k < len(starts):
            at_start = np.array([_objective(x, *args)[0] for x in starts])
            starts = starts[np.argsort(at_start, kind="stable")[:top_k]]
    starts = np.clip(np.atleast_2d(starts), lo, hi)
    found = []
    for x0 in starts:
        res = minimize(_objective, x0, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8})
        if np.isfinite(res.fun) and np.isfinite(res.x).all():
            found.append((float(res.fun), res.x))
    if not found:
        raise FitError("the optimiser found no finite optimum from any start")
    found.sort(key=lambda t: t[0])
    optima: list[np.ndarray] = []
    for _, x in found:  # distinct optima, best first
        if all(np.abs(x - y).max() > 1e-3 for y in optima):
            optima.append(x)
    return FitResult(_theta_to_law(found[0][1]), found[0][0], optima)


def bootstrap_laws(n, d, loss, fit: FitResult, samples: int, rng: np.random.Generator,
                   starts_per_sample: int = 4, delta: float = HUBER_DELTA) -> list[Law]:
    """Refit on ``samples`` resamples of the points (with replacement). Each refit starts from the full fit's
    best ``starts_per_sample`` distinct optima instead of the whole grid: the resamples are close to the data,
    and the 1024-start grid 100 times over would take minutes."""
    n, d, loss = check_points(n, d, loss)
    starts = np.array(fit.optima[:starts_per_sample])
    laws = []
    for _ in range(samples):
        idx = rng.integers(0, len(n), len(n))
        try:
            laws.append(fit_law(n[idx], d[idx], loss[idx], starts=starts, delta=delta).law)
        except FitError:
            continue  # a resample that cannot determine the law (e.g. it missed a size) or found no optimum
    return laws


def interval(values, level: float = 0.95) -> list[float | None]:
    """The central ``level`` percentile interval of the finite values, [None, None] if there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return [None, None]
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
