"""The checkpoint package on its own: the run lock, checksums, convert's refusals and dtype, exports that
never write non-finite weights or leave anything partial, and the one loader's errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from olmo_hybrid import checkpoint as ckpt
from olmo_hybrid.checkpoint import lock as lock_module
from olmo_hybrid.cli import main
from olmo_hybrid.model import HybridLM


def _dtypes(hf_dir) -> set[str]:
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


# --------------------------------------------------------------------------------------------------
# Run lock


def test_lock_names_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    held = ckpt.RunLock(tmp_path).acquire()
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.RunLock(tmp_path).acquire()
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(info.value)
    held.release()
    assert (tmp_path / ckpt.LOCK).read_text() == ""  # released: free, nothing to report
    notes = []
    with ckpt.RunLock(tmp_path, log=notes.append):
        pass
    assert notes == []

    # A holder killed without releasing: its file still names it, but the kernel dropped its flock. (The
    # holder does what RunLock.acquire does, in plain Python, so the test needs no second torch import.)
    script = ("import fcntl, json, os, signal, socket, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
              "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); "
              "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode()); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / ckpt.LOCK)], stderr=subprocess.PIPE)
    assert proc.wait(timeout=60) == -9, proc.stderr.read()
    assert json.loads((tmp_path / ckpt.LOCK).read_text())["pid"] == proc.pid
    with ckpt.RunLock(tmp_path, log=notes.append):
        assert json.loads((tmp_path / ckpt.LOCK).read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "taking the run directory over" in notes[0]


def test_lock_without_flock_support_checks_the_pid(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    lock_file = tmp_path / ckpt.LOCK
    lock_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "x"}))
    with pytest.raises(ckpt.CheckpointError, match=f"pid {os.getpid()}"):
        ckpt.RunLock(tmp_path).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x"}))
    with ckpt.RunLock(tmp_path, log=lambda _: None):
        pass
    lock_file.write_text(json.dumps({"pid": 1, "host": "another-host", "started": "x"}))
    with pytest.raises(ckpt.CheckpointError, match="another-host"):
        ckpt.RunLock(tmp_path).acquire()


# --------------------------------------------------------------------------------------------------
# Checksums


def test_manifest_checksums_find_a_same_size_change(tiny_checkpoints, tmp_path, hash_tree):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoints[1], run)
    path = ckpt.latest_checkpoint(run).path
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["format"] == 3 and all(len(e["sha256"]) == 64 for e in manifest["files"].values())
    assert ckpt.validate_checkpoint(path, checksums=True) is None
    shard = path / ckpt.DCP_DIR / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4] = b"\x00\x00\xc0\x7f"  # a float32 NaN, same size
    shard.write_bytes(bytes(data))
    assert ckpt.validate_checkpoint(path) is None  # sizes alone cannot see it
    assert "model_and_optim/__0_0.distcp is damaged" in ckpt.validate_checkpoint(path, checksums=True)
    before = hash_tree(run)
    with pytest.raises(ckpt.CheckpointError, match="no hf/ export and no usable checkpoint"):
        ckpt.load_model_and_tokenizer(run, log=lambda _: None)
    with pytest.raises(ckpt.CheckpointError, match=r"__0_0\.distcp is damaged"):
        ckpt.load_model_and_tokenizer(run, step=3)
    assert hash_tree(run) == before


# --------------------------------------------------------------------------------------------------
# convert: never onto its source, never into a stranger's directory, another model only with --overwrite


def test_convert_refuses_to_destroy_and_keeps_the_source_dtype(tiny_checkpoints, tmp_path, hash_tree, capsys):
    hf, run = tiny_checkpoints
    src = tmp_path / "src"
    HybridLM.from_pretrained(hf).save_pretrained(src, dtype=torch.bfloat16)  # a bf16 source
    other = tmp_path / "other"
    shutil.copytree(hf, other)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    before = {p: hash_tree(p) for p in (src, other, stranger, run_copy)}
    refused = [([str(src), str(src)], "is the checkpoint being converted"),
               ([str(run_copy), str(run_copy)], "is the checkpoint being converted"),
               ([str(src), str(stranger)], "is not empty and is not a Hugging Face checkpoint"),
               ([str(src), str(other)], "pass --overwrite"),
               ([str(src), str(stranger / "notes.txt")], "is not a directory")]
    for argv, why in refused:
        assert main(["convert", *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("olmo-hybrid convert: error: ") and why in err, err
    assert {p: hash_tree(p) for p in before} == before

    assert main(["convert", str(src), str(tmp_path / "new")]) == 0
    assert "bf16 (the source's dtype)" in capsys.readouterr().out
    assert _dtypes(tmp_path / "new") == {"BF16"}
    assert main(["convert", str(src), str(other), "--overwrite", "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert _dtypes(other) == {"F32"} and hash_tree(other) != before[other]
    assert main(["convert", str(run_copy), str(tmp_path / "from_run")]) == 0  # a run's fp32 weights stay fp32
    assert _dtypes(tmp_path / "from_run") == {"F32"}
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "default: SRC's" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Exports: finite weights only, swapped in whole


def test_export_refuses_non_finite_weights_and_survives_a_full_disk(tiny_checkpoints, tmp_path, hash_tree,
                                                                     file_size_limit):
    hf, _ = tiny_checkpoints
    run = tmp_path / "run"
    shutil.copytree(hf, run / "hf")
    before = hash_tree(run)
    model = HybridLM.from_pretrained(hf)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ckpt.DivergenceError, match=r"non-finite values in model\.layers\.1\.mlp\.down_proj\.weight"):
        ckpt.export_hf(run, model)
    assert hash_tree(run) == before

    model = HybridLM.from_pretrained(hf)
    with file_size_limit(4096), pytest.raises(ckpt.WriteError) as info:
        ckpt.export_hf(run, model)
    assert f"could not write the Hugging Face checkpoint {run / 'hf'}" in str(info.value)
    assert "file too large" in str(info.value) and f"{run / 'hf'} is unchanged" in str(info.value)
    assert hash_tree(run) == before  # nothing partial: no temporary directory, the old export as it was


def test_loader_errors_name_the_file(tiny_checkpoints, tmp_path):
    hf, _ = tiny_checkpoints
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_model_and_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="neither a Hugging Face checkpoint"):
        ckpt.load_model_and_tokenizer(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(hf, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(ckpt.CheckpointError, match=str(broken)):
        ckpt.load_model_and_tokenizer(broken)
    no_tok = tmp_path / "no_tok"
    HybridLM.from_pretrained(hf).save_pretrained(no_tok)
    with pytest.raises(ckpt.CheckpointError, match="pass --tokenizer"):
        ckpt.load_model_and_tokenizer(no_tok)
    model, tok = ckpt.load_model_and_tokenizer(no_tok, require_tokenizer=False)
    assert tok is None and not model.training


def test_one_checkpoint_of_a_run_loads_by_its_path(tiny_checkpoints, hash_tree, capsys):
    """``generate RUN/checkpoints/step_N`` used to say the run had 'no hf/ export and no usable checkpoint'."""
    _, run = tiny_checkpoints
    step = run / "checkpoints" / "step_000003"
    before = hash_tree(run)
    model, tok = ckpt.load_model_and_tokenizer(step)
    reference, _ = ckpt.load_model_and_tokenizer(run, step=3)
    assert tok is not None and tok.vocab_size == 270 and not model.training
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert main(["generate", str(step), "--prompt", "the cat", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert capsys.readouterr().err == ""
    assert hash_tree(run) == before
