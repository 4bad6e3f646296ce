"""``olmo-hybrid scaling fit RESULTS.jsonl --out DIR``: Chinchilla fits, token savings, rollout check, plots.

Writes DIR/fit.json ({"fits": {ARCH: {E, A, alpha, B, beta, ci}}, "token_savings": [...]}), DIR/fit_details.json
(method, target loss, per-architecture diagnostics, skipped architectures, the rollout check) and, with
matplotlib, DIR/loss_vs_tokens.png and DIR/token_savings.png. Method: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.errors import OlmoHybridError, UsageError

EXAMPLES = """examples:
  olmo-hybrid scaling fit runs/ladder-micro/results.jsonl --out runs/ladder-micro/fit
  olmo-hybrid scaling fit results.jsonl --out fit --reference transformer --target-loss 3.2 --sizes 1e9,7e9,70e9
"""
_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_size(text: str) -> float:
    """``7e9``, ``7000000000`` or ``7B`` (K, M, B/G, T suffixes)."""
    t = text.strip()
    scale = _SUFFIX.get(t[-1:].upper(), 1.0) if t and not t[-1].isdigit() else 1.0
    try:
        value = float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 1e9 or 7B)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a parameter count must be positive, got {text!r}")
    return value


def _sizes(text: str) -> list[float]:
    sizes = [parse_size(s) for s in text.split(",") if s.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"no parameter count in {text!r} (e.g. 1e9,7B)")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="olmo-hybrid scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit L(N, D) per architecture; token savings against a reference")
    f.add_argument("results", help="a results file written by `olmo-hybrid ladder` (one JSON object per line)")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--reference", help="architecture the savings are measured against (default: transformer)")
    f.add_argument("--target-loss", type=float, help="loss at which token needs are compared "
                                                     "(default: the median observed loss)")
    f.add_argument("--sizes", type=_sizes, help="non-embedding sizes for the savings table, comma-separated "
                                                "(default: 1e9,7e9,70e9 and the largest size run)")
    f.add_argument("--bootstrap", type=int, default=100, help="bootstrap samples (default 100)")
    f.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    f.add_argument("--starts", type=int, default=None,
                   help="L-BFGS-B starts: the best K points of the 4^5 grid (default 64; 0 = all 1024, slow)")
    f.add_argument("--no-plots", action="store_true", help="skip the figures")
    return p


def _ci(ci) -> str:
    return "[?, ?]" if ci[0] is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def report(an) -> str:
    lines = ["fits (95% bootstrap intervals):"]
    for arch, f in an.fit_json["fits"].items():
        lines.append(f"  {arch:<16} " + "  ".join(f"{k}={f[k]:.4g} {_ci(f['ci'][k])}" for k in
                                                   ("E", "A", "alpha", "B", "beta")))
    if an.fit_json["token_savings"]:
        lines.append(f"token savings D_{an.reference} / D_arch at loss {an.target_loss:.4f}:")
        for row in an.fit_json["token_savings"]:
            ratio = "unreachable" if row["ratio"] is None else f"{row['ratio']:.3f}"
            lines.append(f"  {row['arch']:<16} N={row['params']:.3g}  {ratio}  {_ci(row['ci'])}")
    for arch, r in an.details["rollout"].items():
        if "skipped" in r:
            lines.append(f"rollout {arch}: skipped ({r['skipped']})")
        else:
            lines.append(f"rollout {arch}: fit on {len(r['fit_sizes'])} sizes, predicting N={r['predicted_size']:.3g}: "
                         f"mean |error| {100 * r['mean_abs_rel_error']:.2f}%, max {100 * r['max_abs_rel_error']:.2f}%")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from olmo_hybrid.fsio import atomic_write_text
    from olmo_hybrid.scaling.fit import FitOptions, analyse

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.starts is not None and args.starts < 0:
        raise UsageError(f"--starts must be >= 0 (0: all 1024), got {args.starts}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # found now, not after minutes of fitting
        raise UsageError(f"--out {out} is a file; give a directory")
    opts = FitOptions(reference=args.reference, target_loss=args.target_loss, sizes=args.sizes,
                      bootstrap=args.bootstrap, seed=args.seed)
    if args.starts is not None:
        opts.top_k = args.starts
    try:
        an = analyse(args.results, opts, log=log)
    except ImportError as e:
        raise OlmoHybridError(f"{e.name or 'scipy'} is needed to fit: pip install scipy (the 'scaling' extra)") from e
    atomic_write_text(out / "fit.json", json.dumps(an.fit_json, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "fit_details.json", json.dumps(an.details, indent=2, allow_nan=False) + "\n")
    print(report(an))
    written = [out / "fit.json", out / "fit_details.json"]
    if not args.no_plots:
        try:
            from olmo_hybrid.scaling.plots import plot_loss_vs_tokens, plot_token_savings

            written.append(plot_loss_vs_tokens(an, out / "loss_vs_tokens.png"))
            if an.reference is not None and len(an.laws) > 1:
                written.append(plot_token_savings(an, out / "token_savings.png"))
        except ImportError as e:
            log(f"warning: no plots: {e}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
