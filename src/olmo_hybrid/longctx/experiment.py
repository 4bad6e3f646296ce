"""The long-context experiment: a 3:1 hybrid and a transformer of the same width, trained with RoPE at a short length
on the same data, extended to 8x with the same token budget (hybrid + DRoPE, hybrid + YaRN, transformer + YaRN),
and RULER over 1x-8x for every model, the unextended ones measured past their window.

    olmo-hybrid longctx-experiment benchmarks/longctx_experiment.json [--max-minutes 9] [--dry-run] [--report]

Every piece (prepare the data, train a base model, extend it, RULER at one length) is resumable and recorded, once
finished, as one line of the results file (JSON lines, ``olmo_hybrid.fsio.append_jsonl``) with a fingerprint of
every setting it depends on; a piece whose key and fingerprint are in the file is never run again, and a line of
the same key made with other settings is an error (mixing them would be silent). Training pieces continue from
their newest checkpoint; with ``--max-minutes`` a training piece stops at the deadline (checkpoint saved) and the
driver exits, so a run of short commands finishes the experiment. ``--report`` (also at the end of every run)
writes the tables and curves into ``docs/long_context.md`` from the results file (``report.py``).

Layout under ``out``: ``data/`` (the prepared corpus when built here), ``runs/ARCH-sSEED/base`` and
``runs/ARCH-sSEED/METHOD`` (trainer run directories), ``ruler/ARCH-METHOD-sSEED/LENGTH/`` (RULER files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from olmo_hybrid import checkpoint as ckpt
from olmo_hybrid.config import apply_overrides, from_dict, read_json_object
from olmo_hybrid.data import read_manifest
from olmo_hybrid.errors import ConfigError, DataError
from olmo_hybrid.fsio import append_jsonl, read_jsonl
from olmo_hybrid.longctx.extend import extend
from olmo_hybrid.longctx.methods import METHODS
from olmo_hybrid.train.config import TrainConfig, build_config
from olmo_hybrid.train.trainer import Trainer

PAPER_8X = {("hybrid", "drope"): 85.0, ("hybrid", "yarn"): 76.9, ("transformer", "yarn"): 70.9}  # RULER at 64k
NO_EXTENSION = "base"
RULER_MINUTES = 2.0  # not started with less time left: a piece cut off by the command's limit is lost


@dataclass
class DataSettings:
    path: str = "data"  # prepared corpus (relative to ``out``); built from ``text`` when missing
    text: list[str] = field(default_factory=list)  # text files for `olmo-hybrid prepare` (.xz accepted)
    bpe_vocab: int = 8192
    val_fraction: float = 0.01


@dataclass
class BaseSettings:
    model: str = "60m"  # model preset; every architecture keeps its width, depth, heads and MLP
    seq_len: int = 1024
    tokens: int = 80_000_000
    batch_size: int = 32
    overrides: list[str] = field(default_factory=list)  # training config overrides for both architectures


@dataclass
class ExtendSettings:
    seq_len: int = 8192
    tokens: int = 8_000_000  # the same budget for every method
    methods: dict[str, list[str]] = field(default_factory=lambda: {"hybrid": ["drope", "yarn"],
                                                                    "transformer": ["yarn"]})
    overrides: list[str] = field(default_factory=list)


@dataclass
class RulerSettings:
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    tasks: list[str] = field(default_factory=lambda: [
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multivalue",
        "niah_multiquery", "vt", "fwe"])
    samples: int = 25
    haystack: str = "bundled"
    max_new_tokens: int = 48
    batch_size: int = 16
    seed: int = 42


@dataclass
class ExperimentConfig:
    out: str = "runs/longctx"
    results: str = "benchmarks/results/longctx_experiment.jsonl"
    docs: str = "docs/long_context.md"
    device: str = "auto"
    archs: dict[str, str] = field(default_factory=lambda: {"hybrid": "GGGA", "transformer": "A"})
    seeds: list[int] = field(default_factory=lambda: [0])
    data: DataSettings = field(default_factory=DataSettings)
    base: BaseSettings = field(default_factory=BaseSettings)
    extend: ExtendSettings = field(default_factory=ExtendSettings)
    ruler: RulerSettings = field(default_factory=RulerSettings)

    def __post_init__(self):
        if not self.archs or not self.seeds:
            raise ConfigError("archs and seeds must not be empty")
        for arch, methods in self.extend.methods.items():
            if arch not in self.archs:
                raise ConfigError(f"extend.methods: '{arch}' is not one of archs ({', '.join(self.archs)})")
            bad = [m for m in methods if m not in METHODS]
            if bad:
                raise ConfigError(f"extend.methods.{arch}: unknown method(s) {bad} (known: {', '.join(METHODS)})")
        if self.extend.seq_len <= self.base.seq_len:
            raise ConfigError(f"extend.seq_len={self.extend.seq_len} must exceed base.seq_len={self.base.seq_len}")


def load_experiment(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    return apply_overrides(from_dict(ExperimentConfig, read_json_object(path)), list(overrides))


# --------------------------------------------------------------------------------------------------
# The plan: pieces with keys and fingerprints


@dataclass
class Piece:
    kind: str  # data | train | extend | ruler
    arch: str = ""
    method: str = ""  # extend/ruler: drope, yarn, none; ruler of an unextended model: "base"
    seed: int = 0
    length: int = 0  # ruler
    fingerprint: str = ""
    depends: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        parts = [self.kind, self.arch, self.method, f"s{self.seed}" if self.kind != "data" else "",
                 str(self.length) if self.length else ""]
        return ":".join(p for p in parts if p)


def _digest(settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_pieces(cfg: ExperimentConfig) -> list[Piece]:
    """Every piece in the order it runs; a piece's fingerprint covers its own settings and its inputs'."""
    data = Piece("data", fingerprint=_digest(dataclasses.asdict(cfg.data)))
    pieces = [data]
    for seed in cfg.seeds:
        for arch, pattern in cfg.archs.items():
            train = Piece("train", arch, seed=seed, depends=[data.key],
                          fingerprint=_digest([data.fingerprint, pattern, seed, dataclasses.asdict(cfg.base)]))
            pieces.append(train)
            models = [(NO_EXTENSION, train)]
            for method in cfg.extend.methods.get(arch, []):
                ext = Piece("extend", arch, method, seed, depends=[train.key],
                            fingerprint=_digest([train.fingerprint, method, dataclasses.asdict(cfg.extend)]))
                pieces.append(ext)
                models.append((method, ext))
            r = dataclasses.asdict(cfg.ruler)
            r.pop("lengths")
            for method, source in models:
                for length in cfg.ruler.lengths:
                    pieces.append(Piece("ruler", arch, method, seed, length, _digest([source.fingerprint, r, length]),
                                        [source.key]))
    return pieces


def done_pieces(cfg: ExperimentConfig, pieces: list[Piece], log=print) -> dict[str, dict]:
    """``{key: record}`` of the pieces already in the results file (with this plan's fingerprint)."""
    planned = {p.key: p.fingerprint for p in pieces}
    done = {}
    for line, record in read_jsonl(cfg.results, log=log, error=DataError):
        key = record.get("key")
        if key in planned and record.get("fingerprint") != planned[key]:
            raise ConfigError(f"{cfg.results} line {line}: piece {key} was recorded with other settings (fingerprint "
                              f"{record.get('fingerprint')}, this config: {planned[key]}); use another results file "
                              "or restore the settings it was made with")
        if key in planned:
            done[key] = record
    return done


# --------------------------------------------------------------------------------------------------
# Running the pieces


class Deadline(Exception):
    """The time budget (``--max-minutes``) ran out; finished pieces are recorded, the rest resume next time."""


@dataclass
class Runner:
    cfg: ExperimentConfig
    deadline: float | None = None  # time.time() by which training stops
    log: object = print
    _haystack: object = None  # loaded once for every RULER piece

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def data_path(self) -> Path:
        return self.out / self.cfg.data.path

    def run_dir(self, arch: str, seed: int, stage: str) -> Path:
        return self.out / "runs" / f"{arch}-s{seed}" / stage

    def available(self, piece: Piece) -> bool:
        """Whether what a finished piece made is on this machine: the prepared data, or a run trained to its last
        step and exported (a run stopped at a deadline has an export too, of a model not finished)."""
        if piece.kind == "data":
            return (self.data_path() / "manifest.json").is_file()
        run = self.run_dir(piece.arch, piece.seed, NO_EXTENSION if piece.kind == "train" else piece.method)
        newest = ckpt.latest_checkpoint(run, log=lambda _: None)
        return newest is not None and ckpt.is_hf_dir(run / ckpt.HF_EXPORT) and \
            newest.step == ckpt.read_run_config(run)["trainer"]["steps"]

    def minutes_left(self) -> float:
        return math.inf if self.deadline is None else (self.deadline - time.time()) / 60

    def _deadline_override(self) -> list[str]:
        left = self.minutes_left()
        if left < 1.5:  # not enough to start, validate and save
            raise Deadline(f"{left:.1f} minutes left")
        return [] if left == math.inf else [f"trainer.max_minutes={left - 0.5:.2f}"]

    def run(self, piece: Piece) -> dict:
        started = time.time()
        record = getattr(self, f"_{piece.kind}")(piece)
        return {"key": piece.key, "fingerprint": piece.fingerprint, "kind": piece.kind, "arch": piece.arch,
                "method": piece.method, "seed": piece.seed, "length": piece.length or None, **record,
                "wall_s": round(time.time() - started, 1), **environment()}

    def _data(self, piece: Piece) -> dict:
        path = self.data_path()
        if not (path / "manifest.json").is_file():
            from olmo_hybrid.data.prepare import prepare

            if not self.cfg.data.text:
                raise DataError(f"{path} is not prepared and data.text names no files to prepare it from")
            prepare(self.cfg.data.text, path, bpe_vocab=self.cfg.data.bpe_vocab,
                    val_fraction=self.cfg.data.val_fraction, progress=False)
        m = read_manifest(path)
        return {"path": str(path), "tokenizer": m["tokenizer"]["name"],
                "train_tokens": m["splits"]["train"]["tokens"], "val_tokens": m["splits"]["val"]["tokens"]}

    def base_config(self, arch: str, seed: int):
        b, m = self.cfg.base, read_manifest(self.data_path())
        vocab = int(m.get("padded_vocab_size") or m["vocab_size"])
        steps = max(1, b.tokens // (b.batch_size * b.seq_len))
        return build_config(model=b.model, overrides=[
            f"model.layer_pattern={self.cfg.archs[arch]}", f"model.vocab_size={vocab}",
            f"model.max_seq_len={b.seq_len}", f"data.path={self.data_path()}", f"data.seq_len={b.seq_len}",
            f"data.batch_size={b.batch_size}", f"data.seed={seed}", f"trainer.seed={seed}", f"trainer.steps={steps}",
            f"trainer.save_interval={max(1, steps // 20)}", f"trainer.eval_interval={max(1, steps // 4)}",
            "trainer.sample_tokens=0", "trainer.max_minutes=0", f"trainer.device={self.cfg.device}",
            f"schedule.warmup_steps={max(1, steps // 20)}", *b.overrides, *self._deadline_override()])

    def _train(self, piece: Piece) -> dict:
        cfg = self.base_config(piece.arch, piece.seed)
        run = self.run_dir(piece.arch, piece.seed, NO_EXTENSION)
        result = Trainer(cfg, run, resume=True, log=self.log).fit()
        if result.stopped_early:
            raise Deadline(f"{piece.key} stopped at step {result.steps} of {cfg.trainer.steps}")
        return _training_record(run, cfg, result)

    def _extend(self, piece: Piece) -> dict:
        e = self.cfg.extend
        source = self.run_dir(piece.arch, piece.seed, NO_EXTENSION)
        out = self.run_dir(piece.arch, piece.seed, piece.method)
        result = extend(source, out, piece.method, e.seq_len, tokens=e.tokens, resume=True, log=self.log,
                        overrides=[f"trainer.device={self.cfg.device}", *e.overrides, *self._deadline_override()])
        if result.stopped_early:
            raise Deadline(f"{piece.key} stopped at step {result.steps}")
        return _training_record(out, from_dict(TrainConfig, ckpt.read_run_config(out)), result)

    def _ruler(self, piece: Piece) -> dict:
        from olmo_hybrid.distributed import resolve_device
        from olmo_hybrid.eval.haystack import load_haystack
        from olmo_hybrid.eval.ruler import run_ruler
        from olmo_hybrid.eval.runner import EvalRunner, prefix_token_id

        r = self.cfg.ruler
        if self.minutes_left() < RULER_MINUTES:
            raise Deadline(f"{self.minutes_left():.1f} minutes left, a RULER piece may need {RULER_MINUTES}")
        device = resolve_device(self.cfg.device, setting="device")
        run = self.run_dir(piece.arch, piece.seed, piece.method)
        dtype = torch.bfloat16 if device.type == "cuda" else None
        model, tok = ckpt.load_model_and_tokenizer(run, device=device, dtype=dtype, log=self.log)
        window = model.config.max_seq_len
        model.widen_window(piece.length)  # the unextended models are measured past their window
        runner = EvalRunner(model, batch_size=r.batch_size, max_length=max(piece.length, window),
                            prefix_id=prefix_token_id(tok), progress=False)
        self._haystack = self._haystack or load_haystack(r.haystack)
        result = run_ruler(runner, tok, self._haystack, r.tasks, [piece.length], r.samples, seed=r.seed,
                           max_new_tokens=r.max_new_tokens)
        result.save(self.out / "ruler" / f"{piece.arch}-{piece.method}-s{piece.seed}" / str(piece.length),
                    plot=False)
        n = piece.length
        return {"window": window, "past_window": n > window, "samples": r.samples, "tasks": r.tasks,
                "scores": {t: per[n] for t, per in result.scores.items() if n in per},
                "skipped": {t: per[n] for t, per in result.skipped.items() if n in per},
                "average": result.average.get(n), "haystack": result.haystack, "tokenizer": result.tokenizer}


def _training_record(run: Path, cfg: TrainConfig, result) -> dict:
    from olmo_hybrid.train.metrics import read_metrics

    d = cfg.data
    tokens = d.batch_size * d.seq_len * cfg.trainer.grad_accum * cfg.trainer.steps
    rows = read_metrics(run / ckpt.METRICS)
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first includes compilation
    return {"run": str(run), "steps": cfg.trainer.steps, "seq_len": d.seq_len, "tokens": tokens,
            "params": cfg.model.num_params(), "params_nonemb": cfg.model.num_params(embeddings=False),
            "val_loss": result.final_val_loss, "val_bpb": result.final_val_bpb,
            "tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None}


def environment() -> dict:
    """Device, versions and date of a record."""
    from importlib.metadata import PackageNotFoundError, version

    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__}
    try:
        env["triton"] = version("triton")
    except PackageNotFoundError:
        pass
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return env


def run_experiment(cfg: ExperimentConfig, max_minutes: float | None = None, only: str = "", log=print) -> bool:
    """Run every piece not yet in the results file (those whose key contains ``only``); True when all are done."""
    pieces = plan_pieces(cfg)
    done = done_pieces(cfg, pieces, log=log)
    runner = Runner(cfg, None if max_minutes is None else time.time() + 60 * max_minutes, log)
    todo = [p for p in pieces if p.key not in done and only in p.key]
    log(f"[longctx] {len(done)} of {len(pieces)} pieces done; {len(todo)} to run; results {cfg.results}")
    Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
    by_key = {p.key: p for p in pieces}
    for piece in todo:
        missing = [d for d in piece.depends if d not in done]
        if missing:
            log(f"[longctx] {piece.key}: waits for {', '.join(missing)}")
            continue
        log(f"[longctx] {piece.key}: running")
        try:
            for dep in _chain(by_key, piece):
                if not runner.available(dep):  # finished on another machine: the record stands, the files are gone
                    log(f"[longctx] note: {dep.key} is recorded but what it made is not on this machine: making it "
                        "again (same settings and seed) for its dependents; its recorded line is kept")
                    runner.run(dep)
            record = runner.run(piece)
        except Deadline as e:
            log(f"[longctx] stopping at the time budget ({e}); run the same command again to continue")
            return False
        append_jsonl(cfg.results, record, log=log)
        done[piece.key] = record
        log(f"[longctx] {piece.key}: done in {record['wall_s']:.0f} s")
    return all(p.key in done for p in pieces)


def _chain(by_key: dict[str, Piece], piece: Piece) -> list[Piece]:
    """The pieces ``piece`` depends on, directly or not, inputs first."""
    out: list[Piece] = []
    for key in piece.depends:
        dep = by_key[key]
        out += [p for p in _chain(by_key, dep) if p not in out] + [dep]
    return out


def describe_plan(cfg: ExperimentConfig, done: dict[str, dict], peak_flops: float = 989e12, mfu: float = 0.1) -> str:
    """The pieces, which are done, and an estimate of the GPU time left: training FLOPs at ``mfu`` of an H100's
    dense bf16 peak, plus about a minute of compilation per training run and of RULER per model and seed."""
    lines, flops, runs, rulers = [], 0.0, 0, set()
    vocab = 128 * math.ceil(cfg.data.bpe_vocab / 128)
    for p in plan_pieces(cfg):
        lines.append(f"{'done' if p.key in done else 'todo':<5} {p.key}")
        if p.key in done:
            continue
        if p.kind in ("train", "extend"):
            model_overrides = [o for o in cfg.base.overrides if o.startswith("model.")]
            model = build_config(model=cfg.base.model, overrides=[
                f"model.layer_pattern={cfg.archs[p.arch]}", f"model.vocab_size={vocab}", *model_overrides]).model
            n, tokens = (cfg.base.seq_len, cfg.base.tokens) if p.kind == "train" else (cfg.extend.seq_len,
                                                                                        cfg.extend.tokens)
            flops += model.flops_per_token(n) * tokens
            runs += 1
        elif p.kind == "ruler":
            rulers.add((p.arch, p.method, p.seed))
    minutes = flops / (peak_flops * mfu) / 60 + runs + len(rulers)
    lines.append(f"left: {flops:.2e} training FLOPs in {runs} runs, RULER for {len(rulers)} models: about "
                 f"{minutes:.0f} minutes of one H100 (training at {100 * mfu:g}% MFU, a minute of compilation per "
                 "run and of RULER per model; data preparation adds a few); the results file records measured times")
    return "\n".join(lines)
