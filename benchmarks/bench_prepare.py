"""Time data preparation: the bundled corpus (BPE and dolma2) with 1..N workers, and the loader.

    python benchmarks/bench_prepare.py [--workers 1 2] [--repeats 2] [--replicate K] [--extra FILE ...]

Prints one line per configuration: wall seconds (best of ``--repeats``), tokens and tokens/s. ``--extra``
adds input files (for example a Gutenberg ``validation.txt.xz``) tokenized with dolma2;
``--replicate K`` also tokenizes K copies of the bundled corpus as a JSONL file (a larger, file-based input).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time
from pathlib import Path

from olmo_hybrid.data import DataConfig, TokenDataset, TrainLoader, bundled_corpus, prepare, read_manifest


def _best(fn, repeats: int) -> tuple[float, Path]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _report(name: str, seconds: float, out: Path) -> None:
    m = read_manifest(out)
    tokens = sum(s["tokens"] for s in m["splits"].values())
    print(f"{name:<44} {seconds:7.2f} s {tokens:>12,} tokens {tokens / seconds:>12,.0f} tok/s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--extra", nargs="*", default=[])
    p.add_argument("--replicate", type=int, default=0)
    p.add_argument("--chunk-mb", type=float, default=None, help="override the text per tokenization task")
    args = p.parse_args()
    if args.chunk_mb:
        importlib.import_module("olmo_hybrid.data.prepare")._CHUNK_CHARS = int(args.chunk_mb * 2**20)
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    docs = bundled_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            for label, kw in (("bpe 4096 (trained)", {"bpe_vocab": 4096}), ("dolma2", {"tokenizer": "dolma2"})):
                run = lambda kw=kw, w=workers: prepare(None, Path(tmp) / "b", documents=docs, workers=w,  # noqa: E731
                                                       progress=False, **kw)
                _report(f"bundled, {label}, workers={workers}", *_best(run, args.repeats))
        extra = list(args.extra)
        if args.replicate:
            big = Path(tmp) / "replicated.jsonl"
            with open(big, "w") as f:
                for _ in range(args.replicate):
                    f.writelines(json.dumps({"text": d.text}) + "\n" for d in docs)
            extra.append(big)
        for path in extra:
            for workers in args.workers:
                run = lambda w=workers: prepare([path], Path(tmp) / "x", workers=w, progress=False)  # noqa: E731
                _report(f"{Path(path).name}, dolma2, workers={workers}", *_best(run, args.repeats))
        prepare(None, Path(tmp) / "b", documents=docs, bpe_vocab=4096, workers=1, progress=False)
        cfg = DataConfig(path=str(Path(tmp) / "b"))
        loader = TrainLoader.from_config(cfg, TokenDataset(cfg.path, "train"))
        t0 = time.perf_counter()
        for _ in range(200):
            loader.next_batch()
        dt = time.perf_counter() - t0
        print(f"loader: {200 / dt:,.0f} batches/s of [{cfg.batch_size}, {cfg.seq_len}] "
              f"({200 * cfg.batch_size * cfg.seq_len / dt:,.0f} tok/s)")


if __name__ == "__main__":
    main()
