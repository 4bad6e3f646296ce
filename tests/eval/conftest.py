import pytest
import torch

from olmo_hybrid.config import ModelConfig


def tiny_config(vocab_size: int, pattern: str = "GA", **kw) -> ModelConfig:
    base = {"vocab_size": vocab_size, "d_model": 32, "n_layers": 2, "layer_pattern": pattern, "n_heads": 2, "gdn_heads": 2,
                "gdn_head_k": 16, "gdn_head_v": 16, "mlp_hidden": 64, "rope_theta": 10_000.0, "max_seq_len": 512}
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small byte-level BPE trained on the bundled corpus (fast; ids < 512)."""
    from olmo_hybrid.data.corpus import bundled_corpus
    from olmo_hybrid.data.tokenizer import train_bpe

    texts = [d.text[:20_000] for d in bundled_corpus()[:6]]
    return train_bpe(texts, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model(bpe_tokenizer):
    from olmo_hybrid.model import HybridLM

    torch.manual_seed(0)
    model = HybridLM(tiny_config(bpe_tokenizer.vocab_size, init_std=0.2))
    return model.eval()
