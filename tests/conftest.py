import os

import pytest
import torch

# Triton picks interpreted or compiled kernels when its modules are first imported, and other libraries in the
# suite (transformers) import it early: without a GPU, ask for the interpreter before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The suite runs tiny models, where intra-op threads only add synchronisation: on a busy 2-core machine
    two threads were measured 20-80x slower than one for a tiny forward."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Guard-rail helpers: what a user had, byte for byte, and writes that fail as on a full disk


@pytest.fixture
def hash_tree():
    """``hash_tree(path)``: SHA-256 of every file under ``path`` (or of the file ``path``) by relative path, to
    assert that what a user had is byte-identical after a refused or failed operation."""
    import hashlib
    from pathlib import Path

    def hashes(root) -> dict[str, str]:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        return {p.relative_to(root).as_posix() if p != root else p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in files}

    return hashes


@pytest.fixture
def file_size_limit():
    """``with file_size_limit(n):`` makes every write past byte ``n`` of any file fail with an OSError, as a full
    disk does, in whatever library writes (RLIMIT_FSIZE; SIGXFSZ ignored, so the write returns EFBIG)."""
    import contextlib
    import resource
    import signal

    @contextlib.contextmanager
    def limit(nbytes: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    return limit


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """A HF checkpoint directory (fp32, with a tokenizer) and a training run directory with one checkpoint at
    step 3 and no export, both of one small model; built directly, without training."""
    from olmo_hybrid.checkpoint import save_checkpoint
    from olmo_hybrid.config import ModelConfig, to_dict
    from olmo_hybrid.data.tokenizer import train_bpe
    from olmo_hybrid.model import HybridLM
    from olmo_hybrid.train.config import TrainConfig

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    tok = train_bpe(["the cat sat on the mat, the dog sat on the log"] * 4, vocab_size=270)
    cfg = ModelConfig(vocab_size=272, d_model=32, n_layers=2, layer_pattern="GA", n_heads=2, gdn_heads=2,
                      gdn_head_k=8, gdn_head_v=16, mlp_hidden=64, max_seq_len=256)
    torch.manual_seed(0)
    model = HybridLM(cfg)
    model.save_pretrained(root / "hf", tokenizer=tok)
    run = root / "run"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(run, 3, model=model, optimizer=optimizer, train_state={"tokens": 0},
                    config=to_dict(TrainConfig(model=cfg)))
    (run / "config.json").write_text((run / "checkpoints" / "step_000003" / "config.json").read_text())
    tok.save(run)
    return root / "hf", run
