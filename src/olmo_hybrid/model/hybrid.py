"""HybridLM: token embedding -> GDN, attention and Mamba2 blocks in any pattern -> final norm -> untied LM head.

The block types place their norms differently, exactly as the released OLMo Hybrid does for the first two:
  GDN block (pre-norm):        h = x + GDN(norm(x));        y = h + MLP(norm(h))
  attention block (post-norm): h = x + norm(Attn(x));       y = h + norm(MLP(h))
  Mamba2 block (pre-norm):     h = x + Mamba2(norm(x));     y = h + MLP(norm(h))
The Mamba2 block is the paper's baseline: OLMo-core's Mamba ladders put Mamba2 where the GDN mixer sits, in the
same pre-norm recurrent block with its MLP ("Added FFNs to Mamba2"; mamba_ssm's own block is pre-norm too).
Module names follow the Hugging Face checkpoint (``model.layers.N.linear_attn.q_proj``; Mamba2 layers
``model.layers.N.mixer.in_proj`` as transformers names the mixer), so loading a checkpoint is a state-dict copy
plus a small rename table for older name variants (``model/hf_io.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from olmo_hybrid import ops
from olmo_hybrid.config import ATTN, GDN, MAMBA, ModelConfig
from olmo_hybrid.model.attention import Attention
from olmo_hybrid.model.cache import AttnLayerState, CacheSlice, GDNLayerState, HybridCache, Mamba2LayerState
from olmo_hybrid.model.context import ForwardContext, document_mask
from olmo_hybrid.model.gated_deltanet import GatedDeltaNet
from olmo_hybrid.model.layers import MLP, GatedRMSNorm, RMSNorm
from olmo_hybrid.model.mamba2 import GroupGatedRMSNorm, Mamba2Mixer
from olmo_hybrid.model.rope import RotaryEmbedding


class GDNBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.linear_attn = GatedDeltaNet(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)  # the pre-MLP norm
        self.mlp = MLP(config.d_model, config.mlp_hidden)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: GDNLayerState | None = None) -> torch.Tensor:
        h = x + self.linear_attn(self.input_layernorm(x), ctx, state)
        return h + self.mlp(self.post_attention_layernorm(h))


class Mamba2Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = Mamba2Mixer.from_config(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)  # the pre-MLP norm
        self.mlp = MLP(config.d_model, config.mlp_hidden)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: Mamba2LayerState | None = None) -> torch.Tensor:
        h = x + self.mixer(self.input_layernorm(x), ctx, state)
        return h + self.mlp(self.post_attention_layernorm(h))


class AttnBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config.d_model, config.mlp_hidden)
        self.post_feedforward_layernorm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: AttnLayerState | None = None) -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(x, ctx, state))
        return h + self.post_feedforward_layernorm(self.mlp(h))


class HybridModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # padding_idx: that row gets no gradient, as in transformers (forward unchanged)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        blocks = {GDN: GDNBlock, ATTN: AttnBlock, MAMBA: Mamba2Block}
        self.layers = nn.ModuleList(blocks[kind](config) for kind in config.layer_types)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class HybridLM(nn.Module):
    """A hybrid Gated DeltaNet / attention (/ Mamba2) causal language model.

    ``model(input_ids)`` returns logits ``[B, T, vocab]``. ``doc_ids`` ([B, T], optional) packs several
    documents in a row: attention stays inside a document and GDN / Mamba2 states and convolutions restart
    where the id changes.
    """

    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"HybridLM takes a ModelConfig (olmo_hybrid.config), got {type(config).__name__}; "
                            "HybridLM.from_pretrained(path) loads a checkpoint")
        self.config = config = config.resolved()
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if init and not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # -- initialisation ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Truncated normal (std ``init_std``, +-3 std) for embeddings and projections, zero projection biases;
        ones for norms; PyTorch's conv default for the short convolutions; fla's A/dt init for the GDN gates and
        mamba_ssm's for the Mamba2 ones."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std

        def normal_(t: torch.Tensor):
            t.copy_(torch.nn.init.trunc_normal_(torch.empty(t.shape), std=std, a=-3 * std, b=3 * std,
                                                generator=gen))

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                normal_(module.weight)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (RMSNorm, GatedRMSNorm, GroupGatedRMSNorm)):
                module.weight.fill_(1.0)
            elif isinstance(module, Mamba2Mixer):
                module.reset_ssm_parameters(gen)
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
        cache: CacheSlice | None = None,
        logits_to_keep: int = 0,
        lm_head_fn=None,
        context: ForwardContext | None = None,
    ) -> torch.Tensor:
        """Logits for ``input_ids`` [B, T]; with ``logits_to_keep=n`` only for the last n positions.

        The only loop over the blocks: training, scoring, generation and the engine all come here.
        ``doc_ids`` [B, T] packs several documents in a row (no cache). ``cache`` continues sequences in rows of
        a :class:`HybridCache`: ``cache.for_prefill(rows, start)`` appends T tokens to every row from host
        position ``start``; ``cache.for_decode(rows, active)`` appends one token per row (T = 1) at that row's
        length, on the device, without a host sync. Keys, values, GDN / Mamba2 states and the rows' lengths are
        updated.
        ``lm_head_fn(hidden, lm_head)`` replaces ``lm_head(hidden)`` (hidden: the final-norm output [B, T, d])
        and its result is returned: training uses it to compute the loss in chunks without materialising
        [B, T, vocab] logits. It runs inside ``forward`` so that wrappers that gather parameters around
        ``forward`` (FSDP) have ``lm_head`` gathered. ``context`` replaces the :class:`ForwardContext` built from
        ``input_ids`` and ``doc_ids`` for a call without a cache (context parallelism passes one for its slice of
        each sequence). Token ids are not range-checked here (that would need a host sync): the engine,
        ``generate`` and the data loader check them.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer [batch, seq_len] tensor, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if context is not None and (doc_ids is not None or cache is not None):
            raise ValueError("a ForwardContext given as context= replaces doc_ids and takes no cache")
        ctx = context if context is not None else self._context(input_ids, doc_ids, cache)
        states = cache.cache.views(cache.rows) if cache is not None else [None] * len(self.model.layers)
        h = self.model.embed_tokens(input_ids)
        for layer, state in zip(self.model.layers, states):
            h = layer(h, ctx, state)
        if cache is not None:
            lengths = cache.cache.lengths[cache.rows]
            if ctx.decoding:
                lengths += 1 if cache.active is None else cache.active
            else:
                lengths.fill_(ctx.start + input_ids.shape[1])
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if lm_head_fn is not None:
            return lm_head_fn(self.model.norm(h), self.lm_head)
        return self.lm_head(self.model.norm(h))

    def _context(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None,
                 cache: CacheSlice | None) -> ForwardContext:
        """Positions, RoPE, masks and cache addressing for one call, decided from host values only."""
        b, t = input_ids.shape
        device = input_ids.device
        rotary = self.model.rotary_emb
        if cache is None:
            if self.config.n_attn_layers and t > self.config.max_seq_len:
                raise ValueError(f"sequence of {t} tokens exceeds max_seq_len={self.config.max_seq_len}")
            rope = rotary(torch.arange(t, device=device)[None].expand(b, t))
            if doc_ids is None:
                return ForwardContext(rope)
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
            return ForwardContext(rope, document_mask(doc_ids), ops.reset_mask_from_doc_ids(doc_ids))
        if doc_ids is not None:
            raise ValueError("doc_ids cannot be combined with a cache: give each sequence its own cache row")
        if cache.num_rows != b:
            raise ValueError(f"input_ids has {b} rows but the cache slice has {cache.num_rows} ({cache.rows})")
        if cache.start is None:  # decode
            if t != 1:
                raise ValueError(f"a decode step takes one token per row, got input_ids of shape {(b, t)}")
            positions = cache.cache.lengths[cache.rows]
            return ForwardContext(rotary(positions[:, None]), positions=positions, lengths=positions + 1,
                                  active=cache.active)
        start, end = cache.start, cache.start + t
        if end > cache.cache.capacity:
            raise ValueError(f"cache rows hold {cache.cache.capacity} tokens; {start} used, {t} more requested")
        if self.config.n_attn_layers and end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.config.max_seq_len}")
        rope = rotary(torch.arange(start, end, device=device)[None].expand(b, t))
        return ForwardContext(rope, _lower_right_causal(t, end) if start else None, start=start)

    # -- conveniences --------------------------------------------------------------------------------
    def widen_window(self, max_seq_len: int) -> None:
        """Accept sequences of up to ``max_seq_len`` tokens, past the window the model was configured for, to measure
        how it extrapolates (the "no extension" rows of a long-context comparison). Positions are computed as
        always; nothing is rescaled. Only this model's own config changes (caches and engines built afterwards see
        it); a checkpoint saved from it records the wider window."""
        if max_seq_len > self.config.max_seq_len:
            self.config.max_seq_len = max_seq_len

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.model.embed_tokens.weight.numel()

    def new_cache(self, num_slots: int, capacity: int) -> HybridCache:
        """A zeroed cache of ``num_slots`` rows of ``capacity`` tokens on the model's device, in its dtype."""
        p = next(self.parameters())
        return HybridCache(self.config, num_slots, capacity, device=p.device, dtype=p.dtype)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
                 stop=None, tokenizer=None) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` new tokens per row, through the engine (see ``model/generate.py``)."""
        from olmo_hybrid.model.generate import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, eos_token_id=eos_token_id, attention_mask=attention_mask,
                        pad_token_id=pad_token_id, stop=stop, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device=None) -> "HybridLM":
        from olmo_hybrid.model.hf_io import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None, **kwargs) -> None:
        from olmo_hybrid.model.hf_io import save_pretrained

        save_pretrained(self, path, dtype=dtype, **kwargs)


def _lower_right_causal(queries: int, keys: int):
    """Causal mask whose diagonal ends at the last key (a prefill chunk after cached tokens), as a bias object
    SDPA can run with flash attention."""
    # Imported here: torch.nn.attention.bias imports triton, which only olmo_hybrid.ops may pull in eagerly.
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(queries, keys)
