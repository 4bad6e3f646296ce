"""A ladder: sizes x architectures x seeds, each run yielding one point per token budget, and its plan.

The recipe turns a size into a run with OLMo-core's WSD-S Chinchilla rules (its
``WSDSChinchillaRunConfigurator``; docs/scaling.md), every constant a field of ``RecipeConfig``:

* budget b (a multiple of Chinchilla) = b x 20 tokens per non-embedding parameter N;
* batch = 327,680 x (N / 108M)^(2/3) tokens (2048 x 160 at 108M), rounded to whole sequences (at least 1);
* peak learning rate = 0.0047 / 2 x (N / 108M)^(-1/3); AdamW weight decay 0.1 (not on the embedding),
  beta2 = 0.95 for batches of 524,288 tokens or more, else 0.99;
* warmup = N tokens, then a constant learning rate (the stable phase);
* each budget's point: a branch off the stable phase that decays linearly to 0 over the last
  ``decay_fraction`` of that budget's steps (the trainer's ``wsd`` schedule), then a validation loss.

N is ``ModelConfig.num_params(embeddings=False)``: everything but the input embedding (the LM head counts),
OLMo-core's convention. Every model gets the corpus's (padded) vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from olmo_hybrid.config import MODEL_PRESETS, ConfigError, ModelConfig, from_dict, model_preset, resolve_pattern
from olmo_hybrid.data import read_manifest

# The paper's comparisons (docs/scaling.md). "middle" is built per depth; M is the Mamba2 layer.
ARCHITECTURES = {
    "hybrid": "hybrid",  # 3:1 GDN:attention, attention last (GGGA)
    "transformer": "transformer",
    "pure-gdn": "pure-gdn",
    "hybrid-half": "hybrid-half",  # 1:1
    "hybrid-eighth": "hybrid-eighth",  # 7:1
    "middle": "middle",  # a quarter of the layers attention, as one centred block
    "hybrid-mamba2": "hybrid-mamba2",  # 3:1 Mamba2:attention (MMMA)
    "pure-mamba2": "pure-mamba2",  # M
}


class LadderError(ConfigError):
    """A ladder config cannot be planned (the message names the field, size or architecture)."""


@dataclass
class RecipeConfig:
    """OLMo-core's rules (module docstring); ``fixed_*`` replace a rule for every size (small tests)."""

    tokens_per_param: float = 20.0
    decay_fraction: float = 0.1  # the paper: 5% of each budget's tokens; OLMo-core's default: 10%
    warmup_tokens_per_param: float = 1.0
    batch_tokens: float = 327_680.0  # at base_params
    base_params: float = 108e6
    batch_exponent: float = 2 / 3
    lr: float = 0.0047 / 2  # at base_params
    lr_exponent: float = -1 / 3
    beta2_batch_threshold: int = 524_288  # tokens per step from which beta2 = 0.95 (else 0.99)
    weight_decay: float = 0.1
    fixed_batch_sequences: int = 0  # > 0: this many sequences per step for every size
    fixed_lr: float = 0.0  # > 0: this peak learning rate for every size


@dataclass
class LadderConfig:
    data: str  # a directory written by `olmo-hybrid prepare`
    sizes: list[str]  # MODEL_PRESETS names (60m ... 1b, micro-64 ... micro-256) or custom_sizes keys
    architectures: list[str]  # ARCHITECTURES names or custom_architectures keys
    budgets: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0])
    seeds: list[int] = field(default_factory=lambda: [0])  # model initialisation; the data order is data_seed's
    name: str = "ladder"
    seq_len: int = 2048
    data_seed: int = 0
    max_epochs: float = 4.0  # warn for points that would see the training split more often
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    custom_sizes: dict = field(default_factory=dict)  # name -> ModelConfig fields (optionally "preset": base)
    custom_architectures: dict = field(default_factory=dict)  # name -> layer pattern
    train: list[str] = field(default_factory=list)  # dotted TrainConfig overrides for every run
    save_interval: int = 0  # stable-phase steps between checkpoints (0: about 20 per run)
    keep_checkpoints: bool = False  # keep each decayed branch's final checkpoint

    def __post_init__(self):
        if not self.data:
            raise LadderError("data: give the directory of a corpus prepared with `olmo-hybrid prepare`")
        for name in ("sizes", "architectures", "budgets", "seeds"):
            values = getattr(self, name)
            if not values:
                raise LadderError(f"{name}: give at least one")
            if len(set(values)) != len(values):
                raise LadderError(f"{name}: {values} lists a value twice")
        if any(not b > 0 for b in self.budgets):
            raise LadderError(f"budgets: every budget must be positive, got {self.budgets}")
        self.budgets = sorted(self.budgets)
        if self.seq_len <= 0 or self.max_epochs <= 0 or self.save_interval < 0:
            raise LadderError("seq_len and max_epochs must be positive and save_interval >= 0")
        r = self.recipe
        if not 0 < r.decay_fraction < 1:
            raise LadderError(f"recipe.decay_fraction must be in (0, 1), got {r.decay_fraction}")
        for key in ("tokens_per_param", "batch_tokens", "base_params", "lr"):
            if not getattr(r, key) > 0:
                raise LadderError(f"recipe.{key} must be positive, got {getattr(r, key)}")
        if r.warmup_tokens_per_param < 0 or r.fixed_batch_sequences < 0 or r.fixed_lr < 0:
            raise LadderError("recipe.warmup_tokens_per_param, fixed_batch_sequences and fixed_lr must be >= 0")
        for kind, table in (("custom_sizes", self.custom_sizes), ("custom_architectures", self.custom_architectures)):
            if not isinstance(table, dict):
                raise LadderError(f"{kind}: expected a mapping of name -> {'fields' if kind == 'custom_sizes' else 'pattern'}")
        for name, fields in self.custom_sizes.items():
            if not isinstance(fields, dict):
                raise LadderError(f"custom_sizes.{name}: expected a mapping of ModelConfig fields, got {fields!r}")
        for name, pattern in self.custom_architectures.items():
            if not isinstance(pattern, str) or not pattern:
                raise LadderError(f"custom_architectures.{name}: expected a layer pattern string, got {pattern!r}")
        for item in self.train:
            key = item.split("=", 1)[0].strip()
            if key in RECIPE_OWNED or key.split(".")[0] in ("schedule", "model"):
                raise LadderError(f"train override '{item}': the ladder sets {key} for every run (change the recipe, "
                                  "sizes or architectures instead)")


# TrainConfig fields the ladder derives for every run; a `train` override may not set them.
RECIPE_OWNED = {"data.path", "data.seq_len", "data.batch_size", "data.seed", "optim.lr", "optim.betas",
                "optim.weight_decay", "trainer.steps", "trainer.seed", "trainer.save_interval",
                "trainer.max_minutes", "trainer.eval_interval", "trainer.keep_last_k"}


def load_ladder(path: str | Path, overrides: list[str] = ()) -> LadderConfig:
    from olmo_hybrid.config import apply_overrides, read_json_object

    try:
        data = read_json_object(path)
        missing = [f.name for f in dataclasses.fields(LadderConfig)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise LadderError(f"{path}: missing field(s) {', '.join(missing)}")
        cfg = from_dict(LadderConfig, data)
        return apply_overrides(cfg, list(overrides)) if overrides else cfg
    except ConfigError as e:
        if str(path) in str(e):  # already names the file
            raise
        raise LadderError(f"{path}: {e}") from e


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass
class PointPlan:
    budget: float
    steps: int  # optimizer steps from 0 to the end of the decay
    branch_step: int  # steps of the stable phase before the decay starts
    tokens: int
    epochs: float  # passes over the training split
    fingerprint: str = ""  # of every setting the point's loss depends on


@dataclass
class RunPlan:
    arch: str
    pattern: str
    size: str
    seed: int
    model: ModelConfig
    batch_sequences: int
    lr: float
    beta2: float
    warmup_steps: int
    points: list[PointPlan]

    @property
    def id(self) -> str:
        return f"{self.arch}__{self.size}__s{self.seed}"

    @property
    def params_nonemb(self) -> int:
        return self.model.num_params(embeddings=False)

    def tokens_per_step(self, seq_len: int) -> int:
        return self.batch_sequences * seq_len

    def key(self, point: PointPlan) -> tuple:
        return (self.arch, self.size, self.seed, float(point.budget))


@dataclass
class LadderPlan:
    config: LadderConfig
    data: Path
    manifest: dict
    runs: list[RunPlan]
    warnings: list[str]

    @property
    def train_tokens(self) -> int:
        return int(self.manifest["splits"]["train"]["tokens"])

    def flops(self, run: RunPlan, steps: int) -> float:
        return run.model.flops_per_token(self.config.seq_len) * steps * run.tokens_per_step(self.config.seq_len)


def _size_model(cfg: LadderConfig, size: str) -> ModelConfig:
    if size in cfg.custom_sizes:
        fields = dict(cfg.custom_sizes[size])
        try:
            if "preset" in fields:
                fields = {**dataclasses.asdict(model_preset(fields.pop("preset"))), **fields}
            fields.setdefault("layer_pattern", "A")  # any valid one: each architecture sets its own
            return from_dict(ModelConfig, fields, f"custom_sizes.{size}")
        except ConfigError as e:
            raise LadderError(f"custom_sizes.{size}: {e}") from e
    if size not in MODEL_PRESETS:
        known = sorted(set(MODEL_PRESETS) | set(cfg.custom_sizes))
        raise LadderError(f"unknown size '{size}' (known: {', '.join(known)}; or define it in custom_sizes)")
    return model_preset(size)


def _pattern(cfg: LadderConfig, arch: str, n_layers: int) -> str:
    if arch in cfg.custom_architectures:
        return cfg.custom_architectures[arch]
    if arch not in ARCHITECTURES:
        known = sorted(set(ARCHITECTURES) | set(cfg.custom_architectures))
        raise LadderError(f"unknown architecture '{arch}' (known: {', '.join(known)}; or define it in "
                          "custom_architectures)")
    return resolve_pattern(ARCHITECTURES[arch], n_layers)


def _with_arch(cfg: LadderConfig, base: ModelConfig, arch: str, size: str, vocab: int) -> ModelConfig:
    pattern = _pattern(cfg, arch, base.n_layers)
    try:
        return dataclasses.replace(base, layer_pattern=pattern, vocab_size=vocab,
                                   max_seq_len=max(base.max_seq_len, cfg.seq_len))
    except ConfigError as e:
        raise LadderError(f"architecture '{arch}' (pattern {pattern}) does not fit size '{size}': {e}") from e


def _fingerprint(cfg: LadderConfig, run: RunPlan, point: PointPlan, manifest: dict) -> str:
    settings = {"model": dataclasses.asdict(run.model), "seq_len": cfg.seq_len, "batch": run.batch_sequences,
                "lr": run.lr, "beta2": run.beta2, "warmup": run.warmup_steps, "wd": cfg.recipe.weight_decay,
                "steps": point.steps, "branch_step": point.branch_step, "seed": run.seed,
                "data_seed": cfg.data_seed, "train": sorted(cfg.train),
                "data": [manifest["tokenizer"]["sha256"], manifest["splits"]["train"]["tokens"],
                         manifest["splits"]["val"]["tokens"]]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def plan_ladder(cfg: LadderConfig) -> LadderPlan:
    """Resolve every run and point; errors for unknown sizes or architectures and budgets too short for
    warmup plus decay; warnings for points that would see the data more than ``max_epochs`` times."""
    data = Path(cfg.data)
    try:
        manifest = read_manifest(data)
    except Exception as e:  # DataError: missing or not prepared
        raise LadderError(f"data: {e}") from e
    vocab = int(manifest.get("padded_vocab_size") or manifest["vocab_size"])
    train_tokens = int(manifest["splits"]["train"]["tokens"])
    if int(manifest["splits"]["val"]["tokens"]) < 2:
        raise LadderError(f"data: {data} has no validation split; prepare it with --val-fraction > 0")
    r, runs, warnings = cfg.recipe, [], []
    for size in cfg.sizes:
        base = _size_model(cfg, size)
        for arch in cfg.architectures:
            model = _with_arch(cfg, base, arch, size, vocab)
            n = model.num_params(embeddings=False)
            scale = n / r.base_params
            seqs = r.fixed_batch_sequences or max(1, round(r.batch_tokens * scale ** r.batch_exponent / cfg.seq_len))
            tps = seqs * cfg.seq_len
            lr = r.fixed_lr or r.lr * scale ** r.lr_exponent
            warmup = round(r.warmup_tokens_per_param * n / tps)
            for seed in cfg.seeds:
                run = RunPlan(arch, model.layer_pattern, size, seed, model, seqs, lr,
                              0.95 if tps >= r.beta2_batch_threshold else 0.99, warmup, [])
                for b in cfg.budgets:
                    steps = max(1, round(b * r.tokens_per_param * n / tps))
                    branch = steps - max(1, round(r.decay_fraction * steps))
                    if branch <= warmup:
                        raise LadderError(
                            f"budget {b:g}x of {arch}/{size}: {steps} steps leave {branch} before the decay, not more "
                            f"than the {warmup} warmup steps; lower recipe.warmup_tokens_per_param or "
                            "recipe.decay_fraction, or drop the budget")
                    point = PointPlan(b, steps, branch, steps * tps, steps * tps / train_tokens)
                    point.fingerprint = _fingerprint(cfg, run, point, manifest)
                    run.points.append(point)
                    if point.epochs > cfg.max_epochs and seed == cfg.seeds[0]:
                        warnings.append(f"{arch}/{size} at {b:g}x sees the training split {point.epochs:.2f} times "
                                        f"(more than max_epochs={cfg.max_epochs:g}): repetition bends the law")
                runs.append(run)
    return LadderPlan(cfg, data, manifest, runs, warnings)


def describe(plan: LadderPlan, peak_flops: float = 989e12, mfu: float = 0.2) -> str:
    """A table of the plan: per run its N, batch, learning rate, steps and epochs per budget, FLOPs; totals
    and the GPU time at an assumed ``mfu`` of ``peak_flops`` (default: H100 dense bf16)."""
    cfg = plan.config
    lines = [f"ladder '{cfg.name}': {len(cfg.sizes)} sizes x {len(cfg.architectures)} architectures x "
             f"{len(cfg.seeds)} seeds x {len(cfg.budgets)} budgets = {sum(len(r.points) for r in plan.runs)} points; "
             f"data {plan.data} ({plan.train_tokens:,} training tokens), seq_len {cfg.seq_len}",
             f"{'run':<36} {'N':>9} {'batch':>6} {'lr':>8} {'warmup':>6}  steps/branch@budget (epochs)  FLOPs"]
    total = 0.0
    for run in plan.runs:
        steps = run_steps(run)
        flops = plan.flops(run, steps)
        total += flops
        budgets = ", ".join(f"{p.steps}/{p.branch_step}@{p.budget:g}x ({p.epochs:.2f})" for p in run.points)
        lines.append(f"{run.id:<36} {run.params_nonemb / 1e6:>8.2f}M {run.batch_sequences:>6} {run.lr:>8.2e} "
                     f"{run.warmup_steps:>6}  {budgets}  {flops:.2e}")
    hours = total / (peak_flops * mfu) / 3600 if peak_flops * mfu > 0 else math.nan
    lines.append(f"total {total:.3e} FLOPs (ModelConfig.flops_per_token x tokens, stable phase + every decay); "
                 f"{hours:.2f} GPU-hours at {100 * mfu:g}% MFU of {peak_flops / 1e12:g} TFLOP/s")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def run_steps(run: RunPlan) -> int:
    """Optimizer steps of a whole run: the stable phase to the last branch point plus every decay."""
    return run.points[-1].branch_step + sum(p.steps - p.branch_step for p in run.points)
