"""The cached forward paths: per-row decode with inactive rows, the decode kernel, positions, and no host syncs."""

import pytest
import torch
from test_model import small

from olmo_hybrid import ops
from olmo_hybrid.config import ConfigError, ModelConfig
from olmo_hybrid.model import HybridLM
from olmo_hybrid.model.cache import GDNLayerState
from olmo_hybrid.model.engine import Engine
from olmo_hybrid.model.rope import RotaryEmbedding
from olmo_hybrid.model.sampling import SamplingParams


def prompts(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 61, (n,), generator=gen) for n in lengths]


def prefill(model, cache, slot, ids, chunk=8):
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            model(ids[None, s:s + chunk], cache=cache.for_prefill(slice(slot, slot + 1), s))


def gdn_rows(cache, row):
    return [t[row].clone() for s in cache.layers if isinstance(s, GDNLayerState) for t in vars(s).values()]


@pytest.mark.parametrize("pattern,extra", [("GGGA", {}), ("GAGA", {"n_kv_heads": 2}),
                                           ("GAGA", {"rope_type": "yarn", "rope_factor": 4.0,
                                                     "rope_original_max_seq_len": 12})], ids=["mha", "gqa", "yarn"])
def test_decode_rows_at_their_own_positions_and_inactive_rows_untouched(pattern, extra):
    model = small(pattern, **extra)
    cache = model.new_cache(4, 64)
    seqs = dict(zip((0, 2, 3), prompts((5, 40, 17))))
    for slot, p in seqs.items():
        prefill(model, cache, slot, p)
    # Row 1 is a free slot; row 3 is inactive for the first steps (a prompt still prefilling), then joins.
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        active = torch.tensor([True, False, True, step >= 3])
        tokens = torch.randint(0, 61, (4, 1), generator=gen)
        before = {r: (gdn_rows(cache, r), int(cache.lengths[r])) for r in (1, 3) if not active[r]}
        with torch.no_grad():
            logits = model(tokens, cache=cache.for_decode(slice(0, 4), active))[:, 0]
        for r, (states, length) in before.items():
            assert all(torch.equal(a, b) for a, b in zip(states, gdn_rows(cache, r))) and cache.lengths[r] == length
        for slot in [r for r in seqs if active[r]]:
            seqs[slot] = torch.cat([seqs[slot], tokens[slot]])
            with torch.no_grad():
                ref = model(seqs[slot][None])[0, -1]
            assert (logits[slot] - ref).abs().max() < 1e-4 * ref.abs().max(), (step, slot)
    assert cache.lengths.tolist() == [11, 0, 46, 20]


def test_decode_through_the_triton_kernel_equals_the_torch_reference(monkeypatch):
    # The CUDA decode path (split-KV Triton kernel, per-row lengths on the device) in the interpreter.
    kernel = pytest.importorskip("olmo_hybrid.ops.decode_attention.kernel")
    monkeypatch.setattr(kernel, "_num_sms", lambda device: 16)
    model = small("GAGA", n_kv_heads=2)
    results = []
    for backend in ("torch", "triton"):
        with ops.use_backend(backend, ops=("decode_attention",)):
            cache = model.new_cache(3, 64)
            for slot, p in enumerate(prompts((5, 40, 17))):
                prefill(model, cache, slot, p)
            gen = torch.Generator().manual_seed(3)
            with torch.no_grad():
                results.append(torch.stack([model(torch.randint(0, 61, (3, 1), generator=gen),
                                                  cache=cache.for_decode(slice(0, 3)))[:, 0] for _ in range(3)]))
    assert (results[0] - results[1]).abs().max() < 1e-4 * results[0].abs().max()


def test_cache_addressing_errors_name_the_problem():
    model = small()
    cache = model.new_cache(2, 16)
    ids = torch.randint(0, 61, (2, 4))
    with pytest.raises(ValueError, match="doc_ids cannot be combined with a cache"):
        model(ids, doc_ids=torch.zeros_like(ids), cache=cache.for_prefill(slice(0, 2), 0))
    with pytest.raises(ValueError, match="input_ids has 2 rows but the cache slice has 1"):
        model(ids, cache=cache.for_prefill(slice(0, 1), 0))
    with pytest.raises(ValueError, match="one token per row"):
        model(ids, cache=cache.for_decode(slice(0, 2)))
    with pytest.raises(ValueError, match="hold 16 tokens; 14 used, 4 more requested"):
        model(ids, cache=cache.for_prefill(slice(0, 2), 14))
    with pytest.raises(ValueError, match="rows must be a slice"):
        cache.for_decode(slice(1, 3))
    with pytest.raises(ValueError, match="active must be a bool tensor"):
        cache.for_decode(slice(0, 2), torch.ones(2, dtype=torch.long))


def test_rotary_embedding_equals_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridRotaryEmbedding

    cfg = ModelConfig(vocab_size=61, d_model=96, n_layers=4, n_heads=4, gdn_heads=2, gdn_head_k=12, gdn_head_v=24,
                      mlp_hidden=96, rope_theta=500_000.0, max_seq_len=4096)
    ref = OlmoHybridRotaryEmbedding(transformers.OlmoHybridConfig(
        hidden_size=96, num_attention_heads=4, max_position_embeddings=4096,
        rope_parameters={"rope_theta": 500_000.0, "rope_type": "default"}))
    positions = torch.randint(0, 4096, (2, 50))
    cos, sin = RotaryEmbedding(cfg)(positions)
    ref_cos, ref_sin = ref(torch.zeros(1), positions)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert RotaryEmbedding(ModelConfig(**{**vars(cfg), "rope_theta": None}))(positions) is None


def test_unimplemented_rope_type_is_refused_by_name(tmp_path):
    import json

    with pytest.raises(ConfigError, match="model.rope_type: 'dynamic' is not implemented"):
        small(rope_type="dynamic")
    small().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 10_000.0, "rope_type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'linear' is not implemented"):
        HybridLM.from_pretrained(tmp_path)


class SyncCounter:
    """Counts tensor reads that make the host wait for the device (or give data-dependent shapes), split by
    whether they happen inside ``HybridLM.forward``; CUDA-free, so it runs in the CPU suite."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "any", "all", "cpu",
               "numpy", "unique", "masked_select")

    def __init__(self, monkeypatch):
        self.inside: dict[str, int] = {}
        self.outside: dict[str, int] = {}
        self.depth = 0
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        for name in ("nonzero", "any", "all", "unique", "masked_select"):
            monkeypatch.setattr(torch, name, self._counting(name, getattr(torch, name)))
        get = torch.Tensor.__getitem__

        def getitem(t, index):  # indexing with a bool tensor has a data-dependent shape
            idx = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self._count("bool-mask index")
            return get(t, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
        forward = HybridLM.forward

        def counted_forward(model, *args, **kwargs):
            self.depth += 1
            try:
                return forward(model, *args, **kwargs)
            finally:
                self.depth -= 1

        monkeypatch.setattr(HybridLM, "forward", counted_forward)

    def _count(self, name):
        where = self.inside if self.depth else self.outside
        where[name] = where.get(name, 0) + 1

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            self._count(name)
            return fn(*args, **kwargs)

        return wrapper


def test_no_host_sync_inside_the_forward_of_prefill_decode_and_training(monkeypatch):
    model = small()
    engine = Engine(model, max_batch=3, max_context=64, prefill_chunk=16)
    first, second = (p.tolist() for p in prompts((20, 30)))
    engine.submit(first, 8)
    engine.step()  # the first request prefilled and decoding
    ids = torch.randint(0, 61, (2, 24))
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    counter = SyncCounter(monkeypatch)
    engine.submit(second, 6, SamplingParams(temperature=1.0, seed=3))
    for _ in range(4):
        engine.step()  # 1: prefill in two chunks of the second prompt + decode; 2-4: decode both
    with torch.no_grad():
        model(ids)
        model(ids, doc_ids=doc_ids)
    monkeypatch.undo()
    assert counter.inside == {}
    # Outside the model, the engine reads the sampled tokens once per decode step, and once more for the token
    # that ends a prompt's prefill.
    assert counter.outside == {"tolist": 4, "__int__": 1}
