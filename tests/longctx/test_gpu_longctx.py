"""Long-context paths on a CUDA device (``pytest -m gpu``): YaRN through the engine's Triton decode kernel and CUDA
graphs, and the training-memory estimate against the measured peak of the real trainer."""

from __future__ import annotations

import pytest
import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model import HybridLM
from olmo_hybrid.serve import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def yarn_model() -> HybridLM:
    cfg = ModelConfig(vocab_size=1000, d_model=256, n_layers=4, layer_pattern="GAGA", n_heads=4, gdn_heads=4,
                      gdn_head_k=64, gdn_head_v=128, mlp_hidden=512, max_seq_len=512, rope_theta=10_000.0,
                      rope_type="yarn", rope_factor=8.0, rope_original_max_seq_len=64)
    torch.manual_seed(0)
    model = HybridLM(cfg).cuda().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # sharpen random logits so near-ties cannot decide
    return model


def test_yarn_decode_through_triton_kernel_and_cuda_graphs_equals_full_forwards():
    # Prompts and continuations run up to 4x past YaRN's original length, in rows at different positions.
    model = yarn_model()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).cuda() for n in (70, 5, 190, 33)]
    new = 24
    engine = Engine(model, max_batch=3, max_context=256, device="cuda", dtype=torch.float32, cuda_graphs=True,
                    prefill_chunk=64)
    assert engine._graphs is not None
    ids = [engine.submit(p, new) for p in prompts]
    outs = {o.request_id: o.token_ids for o in engine.run_until_done()}
    for p, i in zip(prompts, ids):
        ref = p[None]
        with torch.no_grad():
            for _ in range(new):
                ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert outs[i] == ref[0, len(p):].tolist()


@pytest.mark.parametrize("ac", ["none", "full"])
def test_training_memory_estimate_tracks_the_measured_peak(tmp_path, ac):
    from olmo_hybrid.data.corpus import bundled_corpus
    from olmo_hybrid.data.prepare import prepare
    from olmo_hybrid.longctx import estimate_training_memory
    from olmo_hybrid.train.config import TrainConfig, merge_config
    from olmo_hybrid.train.trainer import Trainer

    data = prepare(None, tmp_path / "data", documents=bundled_corpus()[:6], bpe_vocab=2048, val_fraction=0.2,
                   workers=1, progress=False)
    model = ModelConfig(vocab_size=2048, d_model=512, n_layers=8, layer_pattern="GGGA", n_heads=8, gdn_heads=8,
                        gdn_head_k=128, gdn_head_v=256, mlp_hidden=1536, max_seq_len=8192, rope_theta=5e5)
    cfg = merge_config(TrainConfig(model=model), {
        "data": {"path": str(data), "seq_len": 8192, "batch_size": 2},
        "trainer": {"steps": 4, "sample_tokens": 0, "export_hf": False, "eval_interval": 0,
                    "activation_checkpointing": ac, "loss_chunk_tokens": 4096, "device": "cuda"}})
    trainer = Trainer(cfg, tmp_path / "run", log=lambda *a, **k: None)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        trainer.train_step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    est = estimate_training_memory(cfg, "cuda")
    predicted = est.total - est.reserve
    assert 0.8 * measured <= predicted <= 2.0 * measured, (est.describe(), measured / 2**30)
