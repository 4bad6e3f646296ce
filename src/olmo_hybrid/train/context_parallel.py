"""Context parallelism (CP): ``parallel.cp_degree`` = n ranks share every sequence of a batch, rank r holding
tokens [r T/n, (r+1) T/n) of each row, so that sequences n times longer than one device holds can be trained.

Applied to the plain ``HybridLM`` from outside (``train/parallel.py`` calls :func:`apply_context_parallel` first,
before activation checkpointing, compile and FSDP2). The model's tensor-free op modules are swapped for the
versions here, so parameter names and checkpoints do not change, and a forward pre-hook turns
``model(input_ids, doc_ids=...)`` on a rank's slice into a ``ForwardContext`` holding RoPE at the slice's global
positions and the masks of the whole sequences (the doc ids are all-gathered: B x T integers per forward).

``parallel.cp_mode``:

- ``ulysses`` (DeepSpeed-Ulysses, what OLMo Hybrid's long-context stage ran at degree 2): around attention and
  the delta rule an all-to-all turns sequence sharding into head sharding (each rank: whole sequences, 1/n of the
  heads), the op runs exactly as on one device, and a second all-to-all turns its output back. n must divide
  every head count: attention query and KV heads, GDN key and value heads.
- ``state_passing``: attention keeps Ulysses; each GDN layer runs on its own slice and the ranks exchange one
  [K, K+V] summary per head (``state_passing.py``): the GDN heads set no limit, and what travels does not grow
  with the sequence.

Short convolutions, in both modes, stay sequence-sharded: a rank receives the last W-1 inputs of the previous
rank's slice (a halo of 3 tokens for W = 4), zeroed where they belong to an earlier document than the token
before its slice, and gives them to the conv as its initial state. The alternative, an all-to-all of the
pre-conv projections so that each rank convolves whole sequences of its heads' channels, moves as many bytes
as the all-to-all of the conv outputs it replaces; the halo serves both modes with one code path, keeps the conv
weights whole, and costs one small all-gather per conv.
"""

from __future__ import annotations

import torch
from torch import nn

from olmo_hybrid import ops
from olmo_hybrid.config import ConfigError, ModelConfig
from olmo_hybrid.model.attention import Attention
from olmo_hybrid.model.context import ForwardContext, document_mask
from olmo_hybrid.model.gated_deltanet import GatedDeltaNet
from olmo_hybrid.model.layers import ShortConv
from olmo_hybrid.train.cp_comm import (CPGroup, all_gather, gather_sequence, heads_to_seq, refuse_state,
                                      seq_to_heads)
from olmo_hybrid.train.state_passing import StatePassingDeltaRule

CP_MODES = ("ulysses", "state_passing")


def check_context_parallel(model: ModelConfig, seq_len: int, degree: int, mode: str) -> None:
    """Refuse, naming the fields, settings that context parallelism of ``degree`` in ``mode`` cannot run."""
    _check_degree_and_heads(model, degree, mode)
    if degree == 1:
        return
    if seq_len % degree:
        raise ConfigError(f"data.seq_len={seq_len} is not divisible by parallel.cp_degree={degree}: each of the "
                          f"{degree} ranks takes an equal slice of every sequence")
    if model.n_gdn_layers and seq_len // degree < model.gdn_conv_size - 1:
        raise ConfigError(f"data.seq_len={seq_len} / parallel.cp_degree={degree} = {seq_len // degree} tokens per "
                          f"rank is shorter than the short convolutions' context (model.gdn_conv_size - 1 = "
                          f"{model.gdn_conv_size - 1})")


def _check_degree_and_heads(model: ModelConfig, degree: int, mode: str) -> None:
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        raise ConfigError(f"parallel.cp_degree must be a positive integer, got {degree!r}")
    if mode not in CP_MODES:
        raise ConfigError(f"parallel.cp_mode: expected one of {', '.join(CP_MODES)}, got {mode!r}")
    m = model.resolved()
    if m.n_mamba_layers and degree > 1:
        raise ConfigError(f"parallel.cp_degree={degree}: context parallelism is not implemented for Mamba2 layers "
                          f"(model.layer_pattern={m.layer_pattern!r} has 'M'); train them with cp_degree=1")
    heads = {}
    if m.n_attn_layers:
        heads.update({"model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads})
    if m.n_gdn_layers and mode == "ulysses":
        heads.update({"model.gdn_heads": m.gdn_heads, "model.gdn_v_heads": m.gdn_v_heads})
    bad = [f"{name}={n}" for name, n in heads.items() if n % degree]
    if bad:
        # state_passing lifts the GDN limit only: suggest it only where it would be enough
        hint = (" (parallel.cp_mode=state_passing has no limit on the GDN heads)"
                if all(b.startswith("model.gdn") for b in bad) else " (attention layers use Ulysses in every mode)")
        raise ConfigError(f"parallel.cp_degree={degree} must divide every head count in {mode} mode (each rank "
                          f"computes 1/{degree} of the heads), but {', '.join(bad)} "
                          f"{'is' if len(bad) == 1 else 'are'} not divisible{hint}")


class UlyssesAttention(nn.Module):
    """``AttentionOp`` on whole sequences for 1/n of the KV heads (and their query heads), between two
    all-to-alls. ``mask`` is the whole sequences' (None: causal)."""

    def __init__(self, inner: nn.Module, cp: CPGroup):
        super().__init__()
        self.inner, self.cp = inner, cp

    def forward(self, q, k, v, mask=None):
        n = self.cp.degree
        b, h, tl, d = q.shape
        hkv = k.shape[1]
        # Query heads j*rep ... j*rep + rep - 1 read KV head j: grouped with it, they go to the same rank.
        q, k, v = seq_to_heads([q.transpose(1, 2).reshape(b, tl, hkv, -1), k.transpose(1, 2), v.transpose(1, 2)],
                               self.cp, "attention")
        t = tl * n
        o = self.inner(q.reshape(b, t, h // n, d).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        o = heads_to_seq(o.transpose(1, 2).reshape(b, t, hkv // n, -1), self.cp, "attention")
        return o.reshape(b, tl, h, d).transpose(1, 2)


class UlyssesDeltaRule(nn.Module):
    """``DeltaRuleOp`` on whole sequences for 1/n of the GDN key heads (and their value heads), between two
    all-to-alls. ``reset_mask`` is the whole sequences'."""

    def __init__(self, inner: nn.Module, cp: CPGroup):
        super().__init__()
        self.inner, self.cp = inner, cp

    def forward(self, q, k, v, g, beta, reset_mask=None, initial_state=None, output_final_state=False):
        refuse_state(initial_state, output_final_state)
        n = self.cp.degree
        b, tl, h, _ = q.shape
        hv, dv = v.shape[2:]
        # Value heads i*m ... i*m + m - 1 read key head i: grouped with it, they go to the same rank.
        q, k, v, g, beta = seq_to_heads([q, k, v.reshape(b, tl, h, -1), g.reshape(b, tl, h, -1),
                                         beta.reshape(b, tl, h, -1)], self.cp, "delta_rule")
        t = tl * n
        o, _ = self.inner(q, k, v.reshape(b, t, hv // n, dv), g.reshape(b, t, hv // n),
                          beta.reshape(b, t, hv // n), reset_mask=reset_mask)
        o = heads_to_seq(o.reshape(b, t, h // n, -1), self.cp, "delta_rule")
        return o.reshape(b, tl, hv, dv), None


def halo_mask(reset_mask: torch.Tensor | None, cp: CPGroup, tl: int, context: int, batch: int,
              device) -> torch.Tensor:
    """bool [B, context]: which of the ``context`` tokens before this rank's slice (whole-sequence
    ``reset_mask`` [B, T] or None) a conv may see: those at positions >= 0 and in the document of the token just
    before the slice (a document that starts inside the halo or at the slice is handled by the conv itself)."""
    start = cp.rank * tl
    pos = start - context + torch.arange(context, device=device)
    valid = (pos >= 0)[None].expand(batch, context)
    if reset_mask is not None:
        doc = reset_mask.long().cumsum(1)
        valid = valid & (doc[:, pos.clamp(min=0)] == doc[:, max(start - 1, 0), None])
    return valid


class HaloShortConv(nn.Module):
    """``ShortConvOp`` on this rank's slice, continuing from the previous rank's last W-1 inputs (zeros on rank 0
    and across a document boundary). ``reset_mask`` is the whole sequences'."""

    def __init__(self, inner: nn.Module, cp: CPGroup):
        super().__init__()
        self.inner, self.cp = inner, cp

    def forward(self, x, weight, reset_mask=None, initial_state=None, output_final_state=False):
        refuse_state(initial_state, output_final_state)
        b, tl, _ = x.shape
        context = weight.shape[-1] - 1
        local_reset = None if reset_mask is None else self.cp.local(reset_mask)
        if context == 0:
            return self.inner(x, weight, reset_mask=local_reset)
        if tl < context:
            raise ValueError(f"a slice of {tl} tokens is shorter than the conv context of {context} tokens")
        tails = all_gather(x[:, tl - context:], self.cp, "conv_halo")  # [n, B, W-1, C]
        # Every rank takes an entry (rank 0 a masked one), so that every rank joins the backward reduce-scatter.
        halo = tails[(self.cp.rank - 1) % self.cp.degree]
        halo = halo * halo_mask(reset_mask, self.cp, tl, context, b, x.device)[..., None].to(halo.dtype)
        return self.inner(x, weight, reset_mask=local_reset, initial_state=halo.transpose(1, 2).contiguous())


def shard_context(model: nn.Module, input_ids: torch.Tensor, doc_ids: torch.Tensor | None,
                  cp: CPGroup) -> ForwardContext:
    """The ForwardContext of this rank's slice ``input_ids`` [B, T/n]: RoPE at its global positions, and the
    whole sequences' document mask and reset mask (from the gathered ``doc_ids``), which the swapped-in op
    modules slice or use whole."""
    b, tl = input_ids.shape
    t = tl * cp.degree
    config = model.config
    if config.n_attn_layers and t > config.max_seq_len:
        raise ValueError(f"sequence of {t} tokens ({cp.degree} slices of {tl}) exceeds max_seq_len="
                         f"{config.max_seq_len}")
    positions = torch.arange(cp.rank * tl, (cp.rank + 1) * tl, device=input_ids.device)
    rope = model.model.rotary_emb(positions[None].expand(b, tl))
    if doc_ids is None:
        return ForwardContext(rope)
    if doc_ids.shape != input_ids.shape:
        raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
    whole = gather_sequence(doc_ids, cp, "doc_ids")
    return ForwardContext(rope, document_mask(whole), ops.reset_mask_from_doc_ids(whole))


def apply_context_parallel(model: nn.Module, cp: CPGroup, mode: str) -> None:
    """Swap the op modules of ``model`` (a plain ``HybridLM``) for their context-parallel versions in ``mode``
    and make ``model(input_ids, doc_ids=...)`` take this rank's slice of every row (a forward pre-hook builds the
    context). The model then serves whole-sequence training and scoring calls only: no cache."""
    _check_degree_and_heads(model.config, cp.degree, mode)
    for module in list(model.modules()):
        if isinstance(module, Attention):
            module.attention_op = UlyssesAttention(module.attention_op, cp)
        elif isinstance(module, GatedDeltaNet):
            wrapper = UlyssesDeltaRule if mode == "ulysses" else StatePassingDeltaRule
            module.delta_rule_op = wrapper(module.delta_rule_op, cp)
        elif isinstance(module, ShortConv):
            module.conv_op = HaloShortConv(module.conv_op, cp)

    def to_slice_context(module, args, kwargs):
        args, kwargs = list(args), dict(kwargs)
        input_ids = args.pop(0) if args else kwargs.pop("input_ids")
        doc_ids = args.pop(0) if args else kwargs.pop("doc_ids", None)
        if args or kwargs.get("cache") is not None or kwargs.get("context") is not None or \
                kwargs.get("logits_to_keep", 0):
            raise ValueError("a context-parallel model takes (input_ids, doc_ids=None, lm_head_fn=None) on this "
                             "rank's slice of each row: no cache, context or logits_to_keep")
        kwargs["context"] = shard_context(module, input_ids, doc_ids, cp)
        return (input_ids,), kwargs

    model.register_forward_pre_hook(to_slice_context, with_kwargs=True)
