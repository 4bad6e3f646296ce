"""Memory accounting: the engine's cache equals the config's per-sequence formula; oversize work is refused."""

import pytest
import torch
from serve_util import tiny_model

from olmo_hybrid.model.cache import cache_bytes_per_sequence
from olmo_hybrid.serve import Engine, MemoryBudgetError, max_sequences


@pytest.mark.parametrize("pattern,dtype", [("GGGA", torch.float32), ("A", torch.bfloat16), ("G", torch.float32),
                                           ("MGMA", torch.bfloat16)])
def test_cache_bytes_equal_config_formula(pattern, dtype):
    model = tiny_model(pattern)
    engine = Engine(model, max_batch=3, max_context=50, dtype=dtype, cuda_graphs=True)
    assert engine._graphs is None  # CUDA graphs are never used off CUDA
    item = torch.empty((), dtype=dtype).element_size()
    per_seq = cache_bytes_per_sequence(model.config, 50, kv_bytes=item)
    report = engine.memory_report()
    assert report["per_sequence"] == per_seq
    assert engine.cache.nbytes() == report["cache_bytes"] == 3 * per_seq["total"]
    assert report["weight_bytes"] == sum(p.numel() for p in model.parameters()) * item
    # Independently: count the tensors the cache actually holds, by kind.
    allocated = {"kv": 0, "state": 0, "ssm": 0, "conv": 0}
    for layer in engine.cache.layers:
        for name, t in vars(layer).items():
            kind = {"keys": "kv", "values": "kv", "recurrent": "state", "ssm": "ssm"}.get(name, "conv")
            allocated[kind] += t.numel() * t.element_size()
            assert t.dtype == (torch.float32 if name in ("recurrent", "ssm") else dtype), name
    assert allocated == {"kv": 3 * per_seq["kv_cache"], "state": 3 * per_seq["gdn_state"],
                         "ssm": 3 * per_seq["mamba_state"], "conv": 3 * per_seq["conv_state"]}
    assert (per_seq["kv_cache"] == 0) == (pattern == "G") and (per_seq["gdn_state"] == 0) == (pattern == "A")
    assert (per_seq["mamba_state"] > 0) == ("M" in pattern)


def test_request_longer_than_a_slot_is_refused_up_front():
    engine = Engine(tiny_model("GGGA"), max_batch=2, max_context=32)
    with pytest.raises(MemoryBudgetError, match=r"needs 40 tokens of cache \(prompt 30 \+ max_new_tokens 10\).*"
                                                r"max_context=32 tokens"):
        engine.submit(list(range(30)), 10)
    assert not engine.has_work
    engine.submit(list(range(30)), 2)  # exactly fills a slot
    assert len(next(engine.run_until_done()).token_ids) == 2


def test_cache_over_budget_is_refused_with_the_numbers():
    model = tiny_model("GGGA")
    per_seq = cache_bytes_per_sequence(model.config, 64, kv_bytes=4)["total"]
    budget = 5 * per_seq + 1
    assert max_sequences(model.config, 64, budget, torch.float32) == 5
    Engine(model, max_batch=5, max_context=64, memory_budget=budget)
    with pytest.raises(MemoryBudgetError, match=r"memory budget.*6 slots x 64 tokens.*at most 5 sequences"):
        Engine(model, max_batch=6, max_context=64, memory_budget=budget)


def test_generation_benchmark_runs_at_tiny_shapes(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.md"
    assert bench.main(["--tiny", "--cases", "b8,64k-fit", "--systems", "ours-hybrid,ours-attn", "--no-fit-run",
                       "--out", str(out)]) == 0
    report = out.read_text()
    assert "| b8 | ours-hybrid | 2 | 64 | 8 |" in report and "| b8 | ours-attn | 2 | 64 | 8 |" in report
    fits = [int(line.split("says ")[1].split()[0]) for line in report.splitlines() if "accounting says" in line]
    assert len(fits) == 2 and fits[0] > 3 * fits[1] > 0  # the hybrid's cache is much smaller per sequence
