"""Shared pieces of the serve tests: a tiny random model, the full-forward reference, a toy tokenizer."""

import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model import HybridLM

VOCAB = 61


def tiny_model(pattern="GGGA", seed=0, **kw) -> HybridLM:
    cfg = dict(vocab_size=VOCAB, d_model=48, n_layers=4, n_heads=4, gdn_heads=2, gdn_head_k=12, gdn_head_v=24,
               mamba_head_dim=12, mamba_state_size=16, mamba_n_groups=2, mlp_hidden=96, rope_theta=10_000.0,
               max_seq_len=400, layer_pattern=pattern)
    cfg.update(kw)
    torch.manual_seed(seed)
    return HybridLM(ModelConfig(**cfg)).eval()


@torch.no_grad()
def greedy_by_full_forwards(model: HybridLM, prompt: torch.Tensor, n: int) -> list[int]:
    """The reference: re-run the whole sequence for every new token."""
    ids = prompt[None]
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def random_prompts(lengths, seed=1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


class LetterTokenizer:
    """Token i decodes to a letter, doubled when i % 3 == 0, so a stop string can span tokens."""

    eos_token_id = None

    def decode(self, ids):
        return "".join(chr(97 + i % 26) * (2 if i % 3 == 0 else 1) for i in ids)
