"""Will a training configuration fit the device? An estimate from the config, checked before any work.

Training memory per rank is three parts:
- static: fp32 weights, gradients and AdamW's two moments (16 bytes per parameter; sharded over the data-parallel
  ranks under FSDP), plus a bf16 copy of the weights when computing in bf16;
- activations kept for backward, per token of the micro-batch: for each block the tensors its backward reads
  (projection inputs and outputs, fp32 norm copies, the attention kernel's inputs, the GDN kernel's saved
  buffers: per 64-token chunk a K x V state and a 64 x 64 matrix per head; the SSD kernel's for Mamba2 layers:
  per chunk an N x P state per head), all blocks without activation
  checkpointing, only each checkpointed block's input with it (plus one block recomputed during backward);
  compiled blocks keep about 0.6 of the eager count (measured on the 1b hybrid);
- the loss: logits in fp32 for the whole micro-batch, or for ``trainer.loss_chunk_tokens`` tokens at a time.
Context parallelism (``parallel.cp_degree``) divides the tokens each rank holds, but not the [T, T] document
mask of intra-document masking, which every rank builds whole.

It is an estimate (allocator fragmentation and kernel workspaces are not modelled; a margin covers them):
``benchmarks/bench_train.py long`` prints it beside the measured peak for the 1b preset. ``check_fits`` refuses
a configuration whose estimate exceeds the device (CUDA: its total memory; CPU: available RAM), saying which
sequence lengths would fit with the current settings and with activation checkpointing and the chunked loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from olmo_hybrid.config import ATTN, MAMBA, ModelConfig
from olmo_hybrid.errors import ConfigError
from olmo_hybrid.model.memory import format_bytes
from olmo_hybrid.train.config import TrainConfig
from olmo_hybrid.train.parallel import checkpointed_layers

CHUNK = 64  # the GDN kernels' chunk length
CUDA_RESERVE = 2 * 2**30  # CUDA context, cuBLAS/Triton workspaces, allocator slack
MARGIN = 1.1
# Compiled blocks fuse the norms' and MLP's elementwise work and keep fewer tensors: the 1b hybrid's measured peak on
# one H100 at 8,192 tokens per step is 47.4 GiB compiled against 61.4 eager (docs/benchmarks.md), whose activations
# the eager count below matches (33 GiB); compiled, they are 0.58 of it.
COMPILED_ACTIVATIONS = 0.6


@dataclass
class MemoryEstimate:
    static: int  # weights, gradients, optimizer state (and bf16 weight copies)
    activations: int  # kept for backward
    loss: int  # logits and their gradient
    reserve: int  # fixed overheads
    tokens: int  # tokens per micro-batch on this rank
    per_token: int  # activation bytes per token at the peak of backward
    kept_per_token: int  # of which: kept from forward for backward

    @property
    def total(self) -> int:
        return int(MARGIN * (self.static + self.activations + self.loss)) + self.reserve

    def describe(self) -> str:
        return (f"about {format_bytes(self.total)}: weights, gradients and AdamW state {format_bytes(self.static)}, "
                f"activations {format_bytes(self.activations)} ({format_bytes(self.per_token)} per token x "
                f"{self.tokens:,} tokens), loss {format_bytes(self.loss)}, plus a {int(100 * (MARGIN - 1))}% margin"
                + (f" and {format_bytes(self.reserve)} reserved" if self.reserve else ""))


def _block_bytes_per_token(c: ModelConfig, kind: str, act: int, reference_gdn: bool) -> int:
    """Bytes one block keeps for backward per token (``act``: bytes of an activation element)."""
    d, m = c.d_model, c.mlp_hidden
    norms = 2 * (2 * 4 * d + act * d)  # two RMSNorms: fp32 input and normalised copies, cast output
    mlp = act * (d + 4 * m)  # input, gate and up outputs, silu, product
    if kind == ATTN:
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        qk_norms = (q + kv) * (2 * 4 + act)
        rotary = 2 * 4 * (q + kv) if c.rope_theta is not None else 0
        attention = act * (2 * q + 2 * kv) + 4 * c.n_heads  # kernel inputs and output, log-sum-exp
        return norms + mlp + act * d + qk_norms + rotary + attention
    if kind == MAMBA:
        return norms + mlp + _mamba_mixer_bytes_per_token(c, act, reference_gdn)
    key, val, hv = c.gdn_heads * c.gdn_head_k, c.gdn_v_heads * c.gdn_head_v, c.gdn_v_heads
    projections = act * (d + 2 * (2 * key + val) + 2 * val)  # input; q/k/v before and after conv; gate, output
    output_norm = 3 * 4 * val  # fp32 output, normalised output and gate
    if reference_gdn:  # the PyTorch reference (CPU): chunk-wide fp32 intermediates per head
        kernel = hv * 4 * (6 * CHUNK + 10 * (c.gdn_head_k + c.gdn_head_v) + 2 * c.gdn_head_k * c.gdn_head_v // CHUNK)
    else:  # the Triton kernel's saved buffers: gates, 2 + 1 chunk-square matrices, chunk states, normalised v
        kernel = hv * (3 * 4 + 2 * CHUNK * 4 + CHUNK * act) + hv * c.gdn_head_k * c.gdn_head_v * act // CHUNK \
            + act * val
    return norms + mlp + projections + output_norm + kernel + 3 * 4 * hv


def _mamba_mixer_bytes_per_token(c: ModelConfig, act: int, reference: bool) -> int:
    """What a Mamba2 mixer keeps for backward per token: projections, the conv (and its bias), fp32 dt, the gated
    norm's fp32 copies, and the SSD kernel's saved buffers (the reference's chunk-wide fp32 intermediates on the CPU;
    the Triton kernel's per-chunk states)."""
    inner, conv, heads = c.mamba_expand * c.d_model, c.mamba_conv_dim, c.mamba_heads
    state = c.mamba_state_size * c.mamba_head_dim  # N x P per head
    projections = act * (c.d_model + (inner + conv + heads) + (2 if c.mamba_conv_bias else 1) * conv + inner)
    dt_and_norm = 2 * 4 * heads + 5 * 4 * inner
    if reference:  # q/k expanded to every head, v, decays and scores [64 x 64] per head and chunk, chunk states
        kernel = 4 * (4 * heads * c.mamba_state_size + 3 * inner + 5 * heads * CHUNK + 2 * heads * state // CHUNK)
    else:
        kernel = act * heads * state // CHUNK + 4 * heads
    return projections + dt_and_norm + kernel


def estimate_training_memory(cfg: TrainConfig, device_type: str, world_size: int = 1) -> MemoryEstimate:
    """Peak training memory per rank for ``cfg`` on a ``device_type`` ("cuda" or "cpu") device."""
    c, t = cfg.model.resolved(), cfg.trainer
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and device_type != "cpu")
    act = 2 if bf16 else 4
    n_params = c.num_params()
    # FSDP shards over dp_shard x cp_degree ranks, i.e. all of them but the replicas.
    shards = max(1, world_size // cfg.parallel.dp_replicate) if world_size > 1 else 1
    static = 16 * n_params // shards + (2 * n_params if bf16 else 0)
    cp = cfg.parallel.cp_degree
    tokens = cfg.data.batch_size * cfg.data.seq_len // cp
    per_layer = [_block_bytes_per_token(c, kind, act, reference_gdn=device_type == "cpu") for kind in c.layer_types]
    chosen = set(checkpointed_layers(c.n_layers, t.activation_checkpointing, t.ac_every))
    kept = sum(act * c.d_model if i in chosen else b for i, b in enumerate(per_layer))
    recompute = max(per_layer) if chosen else 0  # one checkpointed block's activations during its backward
    per_token = kept + (2 * 4 + act) * c.d_model  # + final norm
    gradients = max(per_layer)  # one block's activation gradients in flight during backward
    activations = tokens * (per_token + recompute + gradients)
    if t.compile:
        activations = int(COMPILED_ACTIVATIONS * activations)
    if cfg.data.doc_masking:  # a [T, T] boolean mask per sequence, whole on every CP rank (Ulysses attends over T)
        activations += cfg.data.batch_size * cfg.data.seq_len * cfg.data.seq_len
    loss_tokens = min(t.loss_chunk_tokens, tokens) if t.loss_chunk_tokens else tokens
    loss = loss_tokens * c.vocab_size * (act + 2 * 4)  # logits, fp32 log-probabilities and their gradient
    reserve = CUDA_RESERVE if device_type == "cuda" else 0
    return MemoryEstimate(static, activations, loss, reserve, tokens, per_token + recompute + gradients, per_token)


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes usable for training, description) of ``device``: a GPU's total memory, or the RAM available now."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{device} ({props.name}, {format_bytes(props.total_memory)})"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available, f"{device} ({format_bytes(available)} of RAM available)"


def longest_fitting(cfg: TrainConfig, device_type: str, budget: int, world_size: int = 1, **trainer) -> int:
    """The longest data.seq_len (a multiple of 256 from 256 up) whose estimate fits ``budget`` with the trainer
    settings ``trainer`` replacing cfg's; 0 when not even 256 fits."""
    import dataclasses

    t = dataclasses.replace(cfg.trainer, **trainer)

    def fits(n: int) -> bool:
        trial = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=n), trainer=t,
                                    model=dataclasses.replace(cfg.model, max_seq_len=max(n, cfg.model.max_seq_len)))
        return estimate_training_memory(trial, device_type, world_size).total <= budget

    if not fits(256):
        return 0
    lo, hi = 256, 512
    while fits(hi) and hi < 1 << 24:
        lo, hi = hi, hi * 2
    while hi - lo > 256:
        mid = (lo + hi) // 512 * 256
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_fits(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> MemoryEstimate:
    """Raise ``ConfigError`` when ``cfg`` is estimated not to fit ``device``, saying what would fit."""
    estimate = estimate_training_memory(cfg, device.type, world_size)
    budget, where = device_memory(device)
    if estimate.total <= budget:
        return estimate
    d, t = cfg.data, cfg.trainer
    here = longest_fitting(cfg, device.type, budget, world_size)
    options = [f"data.seq_len <= {here:,} with these settings" if here else
               "not even data.seq_len=256 with these settings"]
    if t.activation_checkpointing != "full" or not t.loss_chunk_tokens:
        best = longest_fitting(cfg, device.type, budget, world_size, activation_checkpointing="full",
                               loss_chunk_tokens=t.loss_chunk_tokens or 8192)
        options.append(f"data.seq_len <= {best:,} with trainer.activation_checkpointing=full and "
                       f"trainer.loss_chunk_tokens={t.loss_chunk_tokens or 8192}")
    if d.batch_size > 1:
        options.append("a smaller data.batch_size (with trainer.grad_accum to keep the tokens per step)")
    raise ConfigError(f"data.seq_len={d.seq_len:,} x data.batch_size={d.batch_size} is estimated to need "
                      f"{estimate.describe()}, more than {where}. What would fit: {'; '.join(options)}. "
                      "(--skip-memory-check runs it anyway.)")
