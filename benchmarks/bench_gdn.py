"""Time the GDN kernels on one GPU, side by side in one process: ours (Triton), fla, and PyTorch SDPA attention.

    python benchmarks/bench_gdn.py                       # both shapes, all implementations, + decode
    python benchmarks/bench_gdn.py --impls ours --profile  # our kernels only, with a per-kernel breakdown
    python benchmarks/bench_gdn.py --impls ours --kernel-settings '{"dot": "tf32"}'  # other KernelSettings

Method: bf16 q, k, v; g = logsigmoid(randn) and beta = sigmoid(randn) in fp32; q/k l2-normalised in the kernel;
``triton.testing.do_bench`` medians (first calls, which compile/autotune, excluded). "fwd" runs with inputs that
require grad (ours then also saves the per-chunk states for the backward); "fwd(infer)" under no_grad;
"fwd+bwd" = forward + ``o.backward(do)`` with grads reset to None. Peak extra memory = peak allocated during one
fwd+bwd minus what was allocated before it (inputs and do). SDPA: ``F.scaled_dot_product_attention(is_causal=True)``
with the flash backend, [B, H, T, 128] bf16, H = the GDN shape's H.

fla's first calls autotune every kernel, compiling each candidate config one after another (on a fresh H100
machine it had not finished its first shape after 200 s, nor after 330 s: more than a device call can spare).
``--fla-warm N`` first runs N worker processes that each compile a disjoint slice of every fla autotuner's configs
into Triton's on-disk cache (and worker 0 our kernels), in parallel on the CPU cores; the main process then
autotunes fla as usual, over all its configs, finding most of them compiled. The workers' own timings and choices
are discarded; a worker whose slice of some kernel holds only configs over the shared-memory limit stops there
with OutOfResources (fla's own autotuning skips such configs), which costs only warm-up coverage.

fla 0.6.0 refuses its backward on Hopper with Triton in [3.4, 3.7.1) (fla issue 640): ``chunk_bwd_dqkwg`` in
``fla.ops.common.chunk_o`` raises when the module global ``TRITON_ABOVE_3_7_1`` is False. This script sets that
global to True in its own process only (``--no-fla-guard-bypass`` keeps the guard), and cross-checks fla's
gradients against ours at every benchmarked shape (printed as relative differences).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

SHAPES = {  # name: (B, T, H, K, V)
    "d128": (8, 4096, 16, 128, 128),
    "olmo7b": (2, 8192, 30, 96, 192),
}


def make_inputs(B, T, H, K, V, device="cuda", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, T, H, K, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, T, H, V, device=device, dtype=torch.bfloat16, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, device=device, generator=gen))
    beta = torch.sigmoid(torch.randn(B, T, H, device=device, generator=gen))
    return q, k, v, g, beta


def gdn_impls(use_fla: bool, bypass_guard: bool, settings_json: str = "{}"):
    from olmo_hybrid.ops import KernelSettings, gated_delta_rule

    settings = KernelSettings(**json.loads(settings_json))
    impls = {"ours": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, use_qk_l2norm_in_kernel=True,
                                                            settings=settings, backend="triton")[0]}
    if use_fla:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        if bypass_guard:
            fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # read by chunk_bwd_dqkwg at call time; this process only
        impls["fla"] = lambda q, k, v, g, b: chunk_gated_delta_rule(q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0]
    return impls


def slice_fla_autotuners(index: int, count: int) -> None:
    """Keep configs index, index + count, ... of every imported fla autotuner (a warm-up worker's share)."""
    from triton.runtime.autotuner import Autotuner

    seen = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("fla.") or module is None:
            continue
        for obj in list(vars(module).values()):
            while obj is not None and not isinstance(obj, Autotuner) and hasattr(obj, "fn"):
                obj = obj.fn  # triton.heuristics wraps the autotuner
            if isinstance(obj, Autotuner) and id(obj) not in seen:
                seen.add(id(obj))
                n = len(obj.configs)
                obj.configs = [c for j, c in enumerate(obj.configs) if j % count == index % count] or \
                    [obj.configs[index % n]]


def warm_worker(index: int, count: int, shapes: list[str], bypass_guard: bool, settings_json: str) -> None:
    """One warm-up worker: fla (sliced configs) and, for worker 0, ours, once fwd+bwd at every shape and at the
    reference-error shape, so that the main process finds their kernels compiled."""
    impls = gdn_impls(True, bypass_guard, settings_json)
    slice_fla_autotuners(index, count)
    for shape in shapes:
        B, T, H, K, V = SHAPES[shape]
        for b, t in ((B, T), (1, REF_T)):
            inputs = [x.requires_grad_() for x in make_inputs(b, t, H, K, V)]
            do = torch.randn(b, t, H, V, device="cuda", dtype=torch.bfloat16)
            impls["fla"](*inputs).backward(do)
            if index == 0:
                impls["ours"](*inputs).backward(do)
                with torch.no_grad():  # the forward without saved states is a separate compilation
                    impls["ours"](*inputs)
    torch.cuda.synchronize()


def run_warm_workers(count: int, shapes: str, bypass_guard: bool, settings_json: str,
                     timeout_s: float = 150.0) -> None:
    """Start the warm-up workers and wait for them (those still running after timeout_s are killed: whatever
    they did not compile, the main process compiles during its own autotuning)."""
    import time

    t0 = time.time()
    args = [sys.executable, os.path.abspath(__file__), "--shapes", shapes, "--kernel-settings", settings_json]
    if not bypass_guard:
        args.append("--no-fla-guard-bypass")
    procs = [subprocess.Popen(args + ["--warm-worker", f"{i}/{count}"]) for i in range(count)]
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, timeout_s - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append("killed")
    print(f"warm-up workers: exit codes {codes}, {time.time() - t0:.0f} s", flush=True)


def bench_fn(fn, inputs, do, mode):
    from triton.testing import do_bench

    if mode == "fwd(infer)":
        def run():
            with torch.no_grad():
                fn(*inputs)
        return do_bench(run, warmup=25, rep=100, return_mode="median")
    if mode == "fwd":
        return do_bench(lambda: fn(*inputs), warmup=25, rep=100, return_mode="median")
    return do_bench(lambda: fn(*inputs).backward(do), warmup=25, rep=200, grad_to_none=list(inputs),
                    return_mode="median")


def peak_extra_gib(fn, inputs, do):
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*inputs).backward(do)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    for t in inputs:
        t.grad = None
    return extra


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cross_check(impls, inputs, do):
    """Relative differences between implementations' outputs and gradients (first impl as the reference)."""
    results = {}
    for name, fn in impls.items():
        for t in inputs:
            t.grad = None
        o = fn(*inputs)
        o.backward(do)
        results[name] = [o.detach()] + [t.grad.detach().clone() for t in inputs]
    names = list(results)
    out = {}
    for other in names[1:]:
        out[f"{other}_vs_{names[0]}"] = {n: rel(a, b) for n, a, b in
                                         zip(["o", "dq", "dk", "dv", "dg", "dbeta"], results[other], results[names[0]])}
    return out


REF_T = 2048


def reference_errors(fn, K, V, H, B=1, T=REF_T):
    """Relative errors of fn's output and gradients vs the float64 chunked reference, at a reduced length (the
    shape's H, so fla's autotuning, keyed on H, K, V, carries over to the timed shape)."""
    from olmo_hybrid.ops import gated_delta_rule

    inputs = [t.requires_grad_() for t in make_inputs(B, T, H, K, V, seed=1)]
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    o = fn(*inputs)
    o.backward(do)
    o_ref = gated_delta_rule(*ref_in, use_qk_l2norm_in_kernel=True, backend="torch")[0]
    o_ref.backward(do.double())
    errs = {"o": rel(o, o_ref)}
    errs.update({n: rel(a.grad, b.grad) for n, a, b in zip(["dq", "dk", "dv", "dg", "dbeta"], inputs, ref_in)})
    return errs


def sdpa_fn(B, T, H, D=128):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def fn(q, k, v, _g=None, _b=None):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fn, [q, k, v], torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)


def kernel_breakdown(fn, inputs, do, iters=5):
    """CUDA time per kernel name over `iters` fwd+bwd iterations (torch.profiler), in ms per iteration."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        for t in inputs:
            t.grad = None  # as in the timed runs: no gradient-accumulation adds
        fn(*inputs).backward(do)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key, t / 1000 / iters, e.count // iters))
    rows.sort(key=lambda r: -r[1])
    return rows


def bench_decode(use_fla):
    from triton.testing import do_bench

    from olmo_hybrid.ops import gated_delta_rule_step

    def step(q, k, v, g, beta, state):  # the in-place decode step of the serving engine
        return gated_delta_rule_step(q, k, v, g, beta, state, use_qk_l2norm_in_kernel=True, inplace=True,
                                     backend="triton")

    rows = []
    for B, H, K, V in [(1, 16, 128, 128), (128, 16, 128, 128), (128, 30, 96, 192), (256, 30, 96, 192)]:
        q, k = (torch.randn(B, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(B, H, V, device="cuda", dtype=torch.bfloat16)
        g = F.logsigmoid(torch.randn(B, H, device="cuda"))
        beta = torch.sigmoid(torch.randn(B, H, device="cuda"))
        state = torch.randn(B, H, K, V, device="cuda") * 0.1
        state_bytes = state.numel() * 4
        ms = do_bench(lambda: step(q, k, v, g, beta, state), warmup=25, rep=100, return_mode="median")
        row = dict(B=B, H=H, K=K, V=V, ours_us=ms * 1e3, ours_TBps=2 * state_bytes / ms / 1e9)
        # Kernel-only time from a CUDA graph replay (removes the Python launch overhead that dominates small B).
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            step(q, k, v, g, beta, state)
            with torch.cuda.graph(graph, stream=stream):
                step(q, k, v, g, beta, state)
        torch.cuda.synchronize()
        ms_graph = do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
        row.update(ours_graph_us=ms_graph * 1e3, ours_graph_TBps=2 * state_bytes / ms_graph / 1e9)
        if use_fla:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            def fla_step():
                fused_recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                                 initial_state=state, output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True)
            ms_fla = do_bench(fla_step, warmup=25, rep=100, return_mode="median")
            row.update(fla_us=ms_fla * 1e3, fla_TBps=2 * state_bytes / ms_fla / 1e9)
        rows.append(row)
    return rows


def environment():
    import triton

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        smi = torch.cuda.get_device_name()
    env = dict(gpu_driver=smi, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               date=datetime.date.today().isoformat())
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        pass
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--impls", default="ours,fla,sdpa")
    p.add_argument("--modes", default="fwd(infer),fwd,fwd+bwd")
    p.add_argument("--no-fla-guard-bypass", action="store_true")
    p.add_argument("--profile", action="store_true", help="per-kernel CUDA time breakdown of fwd+bwd")
    p.add_argument("--decode", action="store_true", help="also time the decode step")
    p.add_argument("--json", help="write all results to this file (rewritten after every shape)")
    p.add_argument("--kernel-settings", default="{}", metavar="JSON",
                   help='our kernels\' olmo_hybrid.ops.KernelSettings fields, e.g. \'{"dot": "tf32", "warps": 8}\'')
    p.add_argument("--fla-warm", type=int, default=0, metavar="N",
                   help="compile fla's autotune configs (and ours) in N parallel worker processes first")
    p.add_argument("--fla-warm-timeout", type=float, default=150.0, help="seconds the warm-up workers may take")
    p.add_argument("--warm-worker", help=argparse.SUPPRESS)  # "i/n": internal, one warm-up worker
    args = p.parse_args(argv)
    if args.warm_worker:
        index, count = map(int, args.warm_worker.split("/"))
        warm_worker(index, count, args.shapes.split(","), not args.no_fla_guard_bypass, args.kernel_settings)
        return 0
    impls_wanted = args.impls.split(",")
    if args.fla_warm and "fla" in impls_wanted:
        run_warm_workers(args.fla_warm, args.shapes, not args.no_fla_guard_bypass, args.kernel_settings,
                         args.fla_warm_timeout)
    env = environment()
    print(json.dumps(env))
    impls = gdn_impls("fla" in impls_wanted, not args.no_fla_guard_bypass, args.kernel_settings)
    results = dict(env=env, kernel_settings=json.loads(args.kernel_settings), gdn=[], decode=[], breakdown={})

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    for shape in args.shapes.split(","):
        B, T, H, K, V = SHAPES[shape]
        inputs = [t.requires_grad_() for t in make_inputs(B, T, H, K, V)]
        do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        todo = {n: f for n, f in impls.items() if n in impls_wanted}
        for name, fn in todo.items():  # each implementation complete before the next (fla's first calls are slow)
            errs = reference_errors(fn, K, V, H)
            print(shape, name, f"vs float64 reference (B=1,T={REF_T},H={H}):", json.dumps(errs), flush=True)
            results.setdefault("reference_errors", {})[f"{shape}/{name}"] = errs
            row = dict(shape=shape, impl=name, B=B, T=T, H=H, K=K, V=V)
            for mode in args.modes.split(","):
                row[mode] = bench_fn(fn, inputs, do, mode)
            row["peak_extra_GiB"] = peak_extra_gib(fn, inputs, do)
            print(json.dumps(row), flush=True)
            results["gdn"].append(row)
            if args.profile:
                bd = kernel_breakdown(fn, inputs, do)
                results["breakdown"][f"{shape}/{name}"] = bd
                for key, ms, cnt in bd[:12]:
                    print(f"   {ms:8.3f} ms  x{cnt:<3d} {key[:100]}", flush=True)
            save()
        if len(todo) > 1:
            diffs = cross_check(todo, inputs, do)
            print(shape, "cross-check", json.dumps(diffs), flush=True)
            results.setdefault("cross_check", {})[shape] = diffs
        if "sdpa" in impls_wanted:
            fn, sin, sdo = sdpa_fn(B, T, H)
            row = dict(shape=shape, impl="sdpa", B=B, T=T, H=H, K=128, V=128)
            for mode in args.modes.split(","):
                row[mode] = bench_fn(fn, sin, sdo, mode)
            row["peak_extra_GiB"] = peak_extra_gib(fn, sin, sdo)
            print(json.dumps(row), flush=True)
            results["gdn"].append(row)
        del inputs, do
        torch.cuda.empty_cache()
        save()
    if args.decode:
        for row in bench_decode("fla" in impls_wanted):
            print(json.dumps(row))
            results["decode"].append(row)
    print("\nshape    impl   " + "  ".join(f"{m:>11s}" for m in args.modes.split(",")) + "   peak GiB")
    for r in results["gdn"]:
        print(f"{r['shape']:8s} {r['impl']:5s} " + "  ".join(f"{r[m]:9.3f}ms" for m in args.modes.split(","))
              + f"   {r['peak_extra_GiB']:.2f}")
    save()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    sys.exit(main())
