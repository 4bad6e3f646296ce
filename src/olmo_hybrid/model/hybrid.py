"""HybridLM: token embedding -> GDN and attention blocks in any pattern -> final norm -> untied LM head.

The two block types place their norms differently, exactly as the released OLMo Hybrid does:
  GDN block (pre-norm):        h = x + GDN(norm(x));        y = h + MLP(norm(h))
  attention block (post-norm): h = x + norm(Attn(x));       y = h + norm(MLP(h))
Module names follow the Hugging Face checkpoint (``model.layers.N.linear_attn.q_proj``), so loading a
checkpoint is a state-dict copy plus a small rename table for older name variants (``model/hf_io.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from olmo_hybrid import ops
from olmo_hybrid.config import ATTN, ModelConfig
from olmo_hybrid.model.attention import Attention
from olmo_hybrid.model.cache import HybridCache
from olmo_hybrid.model.gated_deltanet import GatedDeltaNet
from olmo_hybrid.model.layers import MLP, GatedRMSNorm, RMSNorm, rotary_cos_sin


@dataclass
class StepContext:
    """What every block needs for one forward call, computed once per call (see ``Attention.forward`` for
    ``start`` and ``span``; the serving engine builds its own for per-row positions)."""

    rope: tuple[torch.Tensor, torch.Tensor] | None
    attn_mask: torch.Tensor | None  # [B, 1, T, S] bool (or an SDPA bias), None = plain causal
    reset_mask: torch.Tensor | None  # [B, T] bool, True where a new document starts
    start: int | torch.Tensor
    span: int | None = None
    # Replaces SDPA over the cache when ``start`` is per-row: attend(q [B, H, 1, D], keys, values) -> [B, H, 1, D]
    # (the serving engine's split-KV kernel, which reads each row's length on the device).
    attend: Callable | None = None


class GDNBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.linear_attn = GatedDeltaNet(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)  # the pre-MLP norm
        self.mlp = MLP(config.d_model, config.mlp_hidden)

    def forward(self, x: torch.Tensor, step: StepContext, layer_cache=None) -> torch.Tensor:
        h = x + self.linear_attn(self.input_layernorm(x), step.reset_mask, layer_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class AttnBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config.d_model, config.mlp_hidden)
        self.post_feedforward_layernorm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: torch.Tensor, step: StepContext, layer_cache=None) -> torch.Tensor:
        a = self.self_attn(x, step.rope, step.attn_mask, layer_cache, step.start, step.span, step.attend)
        h = x + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(h))


class HybridModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(AttnBlock(config) if kind == ATTN else GDNBlock(config)
                                    for kind in config.layer_types)
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class HybridLM(nn.Module):
    """A hybrid Gated DeltaNet / attention causal language model.

    ``model(input_ids)`` returns logits ``[B, T, vocab]``. ``doc_ids`` ([B, T], optional) packs several
    documents in a row: attention stays inside a document and GDN state and convolutions restart where
    the id changes.
    """

    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if init and not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # -- initialisation ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Truncated normal (std ``init_std``, +-3 std) for embeddings and projections; ones for norms;
        PyTorch's conv default for the short convolutions; fla's A/dt init for the GDN gates."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std

        def normal_(t: torch.Tensor):
            t.copy_(torch.nn.init.trunc_normal_(torch.empty(t.shape), std=std, a=-3 * std, b=3 * std,
                                                generator=gen))

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                normal_(module.weight)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)
            elif isinstance(module, GatedDeltaNet):
                module.reset_gate_parameters(gen)
                for conv in (module.q_conv1d, module.k_conv1d, module.v_conv1d):
                    bound = conv.weight.shape[-1] ** -0.5
                    conv.weight.copy_(torch.empty(conv.weight.shape).uniform_(-bound, bound, generator=gen))

    # -- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        logits_to_keep: int = 0,
        lm_head_fn=None,
    ) -> torch.Tensor:
        """Logits for ``input_ids`` [B, T]; with ``logits_to_keep=n`` only for the last n positions.

        ``cache`` continues a sequence (prefill chunks or single decode tokens): new keys/values and GDN
        states are written into it. ``lm_head_fn(hidden, lm_head)`` replaces ``lm_head(hidden)`` (hidden:
        the final-norm output [B, T, d]) and its result is returned: training uses it to compute the loss
        in chunks without materialising [B, T, vocab] logits. It runs inside ``forward`` so that wrappers
        that gather parameters around ``forward`` (FSDP) have ``lm_head`` gathered.
        """
        self._check_ids(input_ids)
        b, t = input_ids.shape
        step = self._prepare(input_ids, doc_ids, position_ids, cache)
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, step, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.end(doc_ids if doc_ids is not None else torch.ones_like(input_ids))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if lm_head_fn is not None:
            return lm_head_fn(self.model.norm(h), self.lm_head)
        return self.lm_head(self.model.norm(h))

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync per forward, not two
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids has token id {lo if lo < 0 else hi} outside the vocabulary "
                             f"[0, {self.config.vocab_size})")

    def _prepare(self, input_ids, doc_ids, position_ids, cache) -> StepContext:
        b, t = input_ids.shape
        device = input_ids.device
        start = cache.length if cache is not None else 0
        if cache is not None:
            docs = doc_ids if doc_ids is not None else torch.ones_like(input_ids)
            reset_mask, start = cache.begin(docs)
            k_docs = cache.doc_ids[:, :start + t]
            q_pos = torch.arange(start, start + t, device=device)
            k_pos = torch.arange(start + t, device=device)
            attn_mask = (k_docs[:, None, :] == docs[:, :, None]) & (k_pos[None, None, :] <= q_pos[None, :, None])
            attn_mask = attn_mask[:, None]
        elif doc_ids is not None:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
            reset_mask = ops.reset_mask_from_doc_ids(doc_ids)
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            attn_mask = ((doc_ids[:, None, :] == doc_ids[:, :, None]) & causal)[:, None]
        else:
            reset_mask = attn_mask = None
        if self.config.n_attn_layers and start + t > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds max_seq_len={self.config.max_seq_len}")
        rope = None
        if self.config.rope_theta is not None and self.config.n_attn_layers:
            if position_ids is None:
                position_ids = torch.arange(start, start + t, device=device)[None].expand(b, t)
            rope = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        return StepContext(rope, attn_mask, reset_mask, start)

    # -- conveniences --------------------------------------------------------------------------------
    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.model.embed_tokens.weight.numel()

    def new_cache(self, batch_size: int, max_len: int) -> HybridCache:
        p = next(self.parameters())
        return HybridCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        from olmo_hybrid.model.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device=None) -> "HybridLM":
        from olmo_hybrid.model.hf_io import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None, **kwargs) -> None:
        from olmo_hybrid.model.hf_io import save_pretrained

        save_pretrained(self, path, dtype=dtype, **kwargs)
