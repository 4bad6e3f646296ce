"""Where a prefix-cache hit's time to first token goes, at the shape of tests/serve/test_prefix_cache_gpu.py's
TTFT test (d_model 1024, 8 layers GGGA, vocabulary 100352, bf16, one GPU): one eager prefill forward of 64 and of
4,096 tokens, each as host time (until the call returns) and wall time (after a device sync), the aten calls of
one forward, and the engine's TTFT with and without the prefix cache.
    python benchmarks/ttft_breakdown.py
"""

from __future__ import annotations

import statistics
import time

import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model import HybridLM
from olmo_hybrid.model.prefix_cache import prefix_block_bytes
from olmo_hybrid.serve import Engine


def timed(fn, reps=7):
    host, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
    return statistics.median(host[2:]) * 1e3, statistics.median(wall[2:]) * 1e3


def main():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100352, d_model=1024, n_layers=8, n_heads=8, gdn_heads=8, gdn_head_k=96,
                      gdn_head_v=192, mlp_hidden=4096, rope_theta=500_000.0, layer_pattern="GGGA", max_seq_len=8192)
    model = HybridLM(cfg).to("cuda", torch.bfloat16).eval()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    engine = Engine(model, max_batch=1, max_context=4096 + 64 + 8)
    ids = torch.randint(1000, 90000, (1, 4096), device="cuda")
    with torch.no_grad():
        for t in (64, 4096):
            h, w = timed(lambda: model(ids[:, :t], cache=engine.cache.for_prefill(slice(0, 1), 0), logits_to_keep=1))
            print(f"eager prefill forward, {t} tokens: host {h:.2f} ms, wall {w:.2f} ms")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(ids[:, :64], cache=engine.cache.for_prefill(slice(0, 1), 0), logits_to_keep=1)
        calls = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        print(f"aten calls in one forward (nested included): {calls}")
    system = ids[0]
    questions = [torch.randint(1000, 90000, (64,), device="cuda") for _ in range(6)]
    for use_cache in (False, True):
        probe = Engine(model, max_batch=1, max_context=8)
        budget = 20 * prefix_block_bytes(probe.cache, 256) if use_cache else 0
        eng = Engine(model, max_batch=1, max_context=4096 + 64 + 8, cuda_graphs=True, prefix_cache_bytes=budget)
        eng.generate([torch.cat([system, questions[0]])], 2)
        ttft = [eng.generate([torch.cat([system, q])], 2)[0].first_token_s * 1e3 for q in questions[1:]]
        print(f"engine TTFT, prefix cache {'on' if use_cache else 'off'}: median {statistics.median(ttft):.2f} ms "
              f"({', '.join(f'{x:.1f}' for x in ttft)})")


if __name__ == "__main__":
    main()
