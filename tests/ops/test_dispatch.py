"""The (op, backend) table, the backend context and the "auto" rule, with fake fast backends (no kernels run)."""

import _thread
import contextvars
import logging
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from olmo_hybrid import ops
from olmo_hybrid.ops import BackendUnavailableError, dispatch, gated_delta_rule
from olmo_hybrid.ops.gated_delta_rule.reference import chunk_gated_delta_rule_torch


def small_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 4, 1, 4, generator=gen) for _ in range(3))
    g = -torch.rand(1, 4, 1, generator=gen)
    beta = torch.rand(1, 4, 1, generator=gen)
    return dict(q=q, k=F.normalize(k, dim=-1), v=v, g=g, beta=beta)


def test_backend_dispatch(monkeypatch, caplog):
    """A fake "triton" implementation: chosen by "auto" only for CUDA devices and accepted arguments; otherwise
    "auto" falls back to torch with a single warning, and an explicit request raises."""
    calls = []
    fake = lambda **kw: calls.append(kw) or ("fake", None)
    refuse_reset = lambda reset_mask=None, **_: "reset_mask is not supported" if reset_mask is not None else None
    monkeypatch.setattr(dispatch, "_loaded", {("gated_delta_rule", "triton"): (fake, refuse_reset)})
    monkeypatch.setattr(dispatch, "_warned", set())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    assert dispatch.select("gated_delta_rule", "auto", cuda, {}) is fake
    assert dispatch.select("gated_delta_rule", "auto", cpu, {}) is chunk_gated_delta_rule_torch
    with caplog.at_level(logging.WARNING, logger="olmo_hybrid.ops"):
        for _ in range(3):
            assert dispatch.select("gated_delta_rule", "auto", cuda, {"reset_mask": 1}) is chunk_gated_delta_rule_torch
    assert [r.getMessage() for r in caplog.records].count(
        "gated_delta_rule: using the slow PyTorch reference on CUDA because reset_mask is not supported") == 1
    with pytest.raises(BackendUnavailableError, match="reset_mask is not supported"):
        dispatch.select("gated_delta_rule", "triton", cpu, {"reset_mask": 1})
    with pytest.raises(BackendUnavailableError, match="has no implementation of causal_conv1d"):
        dispatch.select("causal_conv1d", "fla", cpu, {})

    x = small_inputs(seed=14)
    assert gated_delta_rule(**x, backend="triton") == ("fake", None) and calls[0]["scale"] == 0.5
    with ops.use_backend("triton"):
        assert gated_delta_rule(**x) == ("fake", None)
        assert gated_delta_rule(**x, backend="torch")[0].shape == (1, 4, 1, 4)
    assert gated_delta_rule(**x)[0].shape == (1, 4, 1, 4)  # "auto" again: torch on the CPU
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        gated_delta_rule(**x, backend="cuda")


def test_unavailable_backend_raises(monkeypatch):
    """A backend whose package is missing is listed as unavailable and refused by name, with the import error."""
    table = dispatch.implementation

    def without_fla(op, backend):
        if backend == "fla":
            raise ImportError("No module named 'fla'")
        return table(op, backend)

    monkeypatch.setattr(dispatch, "implementation", without_fla)
    monkeypatch.setattr(dispatch, "_loaded", {})
    assert "fla" not in ops.available_backends("gated_delta_rule")
    with pytest.raises(BackendUnavailableError, match="backend 'fla' is unavailable: .*could not be imported"):
        gated_delta_rule(**small_inputs(seed=15), backend="fla")


def test_every_op_has_a_torch_implementation_and_fast_ones_a_check():
    for op in dispatch.OPS:
        fn, check = dispatch.implementation(op, "torch")
        assert callable(fn) and check is None
    assert callable(dispatch.implementation("gated_delta_rule", "triton")[1])
    with pytest.raises(LookupError, match="backend 'fla' has no implementation of causal_conv1d_step"):
        dispatch.implementation("causal_conv1d_step", "fla")


def test_use_backend_nests_restores_and_limits_to_ops():
    current = ops.current_backend
    assert current("gated_delta_rule") == "auto"
    with ops.use_backend("torch"):
        assert all(current(op) == "torch" for op in dispatch.OPS)
        with ops.use_backend("triton", ops=("causal_conv1d",)):
            assert current("causal_conv1d") == "triton" and current("gated_delta_rule") == "torch"
        assert current("causal_conv1d") == "torch"
    assert all(current(op) == "auto" for op in dispatch.OPS)
    with pytest.raises(RuntimeError, match="inside"):
        with ops.use_backend("torch"):
            raise RuntimeError("inside")
    assert current("gated_delta_rule") == "auto"
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with ops.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        with ops.use_backend("torch", ops=("conv",)):
            pass


def test_use_backend_is_per_thread():
    """Two threads inside their own blocks at the same time each see their own choice."""
    barrier = threading.Barrier(2, timeout=10)
    seen = {}

    def worker(name):
        with ops.use_backend(name):
            barrier.wait()
            seen[name] = ops.current_backend("gated_delta_rule")
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("torch", "fla")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"torch": "torch", "fla": "fla"}
    assert ops.current_backend("gated_delta_rule") == "auto"


def test_importing_ops_imports_neither_triton_nor_fla():
    code = ("import sys, olmo_hybrid.ops; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'fla') or m == 'torch._dynamo']; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_autograd_device_threads_see_the_backward_callers_choice():
    """CUDA's autograd runs backward (and the recomputation of checkpointed activations) in device threads, where
    torch stashes the context of the thread that called backward(); a fresh thread with that stash reads it."""
    seen = {}

    def device_thread(context):
        torch._C._stash_obj_in_tls("context", context)
        try:
            seen["stashed"] = ops.current_backend("gated_delta_rule")
        finally:
            torch._C._remove_obj_from_tls("context")
        seen["plain"] = ops.current_backend("gated_delta_rule")

    with ops.use_backend("torch"):
        context = contextvars.copy_context()
    thread = threading.Thread(target=device_thread, args=(context,))
    thread.start()
    thread.join()
    assert seen == {"stashed": "torch", "plain": "auto"}


def in_foreign_thread(fn):
    """``fn()`` in a thread started outside Python's threading module, as autograd's device threads are (torch
    before 2.13 gives them no context); its result, or the exception it raised."""
    done = threading.Event()
    box = {}

    def body():
        try:
            box["result"] = fn()
        except Exception as e:  # handed back to the test
            box["result"] = e
        finally:
            done.set()

    _thread.start_new_thread(body, ())
    assert done.wait(30)
    return box["result"]


def test_device_threads_without_a_stashed_context_take_the_open_block():
    """torch < 2.13 (the device image's 2.11) hands no context to autograd's device threads: they take the
    innermost use_backend block open in the process, "auto" when none is, and refuse when threads disagree."""
    read = lambda: ops.current_backend("gated_delta_rule")  # noqa: E731
    assert in_foreign_thread(read) == "auto"
    with ops.use_backend("torch"):
        with ops.use_backend("triton", ops=("causal_conv1d",)):
            assert in_foreign_thread(read) == "torch"
            assert in_foreign_thread(lambda: ops.current_backend("causal_conv1d")) == "triton"
        with ops.use_backend("triton"):
            assert in_foreign_thread(read) == "triton"
        assert in_foreign_thread(read) == "torch"
        opened, release = threading.Event(), threading.Event()

        def other_thread(name):
            with ops.use_backend(name):
                opened.set()
                release.wait(30)

        for name, refused in (("torch", False), ("triton", True)):
            opened.clear(), release.clear()
            other = threading.Thread(target=other_thread, args=(name,))
            other.start()
            assert opened.wait(30)
            got = in_foreign_thread(read)
            release.set()
            other.join()
            if refused:
                assert isinstance(got, RuntimeError) and "different backends" in str(got) and "triton" in str(got)
            else:
                assert got == "torch"
    assert in_foreign_thread(read) == "auto" and dispatch._open_blocks == {}


@pytest.mark.gpu
def test_gpu_checkpoint_recomputation_uses_the_chosen_backend():
    """Activation checkpointing on CUDA recomputes the forward in an autograd device thread: under
    ``use_backend("torch")`` it must recompute with the reference, giving the gradients of the plain run bit for
    bit (with Triton in the recomputation they would differ, or the checkpoint would refuse the saved tensors)."""
    from torch.utils.checkpoint import checkpoint

    x = {n: t.cuda() for n, t in small_inputs(seed=16).items()}

    def loss(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0].square().sum()

    grads = []
    for wrapped in (False, True):
        leaves = [t.clone().requires_grad_() for t in x.values()]
        with ops.use_backend("torch"):
            out = checkpoint(loss, *leaves, use_reentrant=False) if wrapped else loss(*leaves)
            out.backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
