"""One error style for every subcommand: an input error is one line on stderr and a non-zero exit, never a
traceback (unless ``--debug`` / ``OLMO_HYBRID_DEBUG=1``); a failed write leaves what the user had untouched.

The bad inputs run in this process (``olmo_hybrid.cli.main``); a few real subprocesses check what a terminal
shows. Every command in ``COMMANDS`` must appear in ``BAD_INPUTS``, so a new command needs its cases here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from olmo_hybrid.cli import COMMANDS, main

# Per command: (arguments, a phrase the one-line message must contain). Placeholders: HF (a HF checkpoint),
# RUN (a run directory), TEXT (a text file), EMPTY (an empty directory), STRANGER (a directory of other files),
# MISSING (a path that does not exist), OUT (a new output directory), CHAT / BADCHAT (conversations, the second
# without an assistant turn), PAIRS / SAMEPAIR (preference pairs, the second with chosen == rejected), LATIN /
# LATINCHAT (a text file / conversations whose line 2 is Latin-1, not UTF-8), GELU (a HF checkpoint whose config.json
# asks for a setting we do not implement), NANHF (a HF checkpoint with a NaN weight).
BAD_INPUTS = {
    "train": [(["--bogus"], "unrecognized arguments: --bogus"),
              (["optim.lr=inf", "--dry-run"], "optim.lr: expected a finite number"),
              (["nosuch.x=1", "--dry-run"], "unknown config section 'nosuch'"),
              (["MISSING/cfg.json", "--dry-run"], "does not exist"),
              (["data.seq_len=99999", "--dry-run"], "exceeds the model's limit"),
              (["--steps", "x"], "invalid int value"),
              (["--out", "TEXT"], "is a file, not a directory"),
              (["--out", "STRANGER"], "is not empty and holds no training run"),
              (["--out", "RUN"], "already holds checkpoints"),
              (["--out", "RUN", "--resume", "--overwrite"], "contradict each other"),
              (["--out", "RUN/checkpoints/new"], "which the run in"),
              (["model.n_kv_heads=0", "--dry-run"], "model.n_kv_heads: must be a positive integer or null"),
              (["model.rope_type=linear", "--dry-run"], "model.rope_type: 'linear' is not implemented"),
              (["model.init_std=-1", "--dry-run"], "model.init_std: must be >= 0"),
              (["optim.betas=[0.9,nan]", "--dry-run"], "optim.betas: expected a JSON list"),
              (["--seed", "-1", "--dry-run"], "trainer.seed must be in [0, 2**32)"),
              (["data.path=TEXT", "--out", "OUT"], "text.txt is a file")],
    "prepare": [(["--out", "OUT"], "give input files/directories or --hf-dataset"),
                (["MISSING", "--out", "OUT"], "does not exist"),
                (["TEXT", "--out", "OUT", "--workers", "0"], "--workers must be at least 1"),
                (["TEXT", "--out", "OUT", "--val-fraction", "nan"], "val_fraction must be in [0, 1)"),
                (["TEXT", "--out", "STRANGER"], "not empty and holds no prepared dataset"),
                (["TEXT", "--out", "OUT", "--bpe-vocab", "0", "--val-fraction", "0"], "one merge), got 0"),
                (["TEXT", "TEXT", "--out", "OUT"], "text.txt is given twice"),
                (["TEXT", "--out", "OUT", "--workers", "100000"], "far more processes"),
                (["TEXT", "--out", "OUT", "--seed", "-1"], "seed must be in [0, 2**32)"),
                (["LATIN", "--out", "OUT", "--val-fraction", "0"], "latin1.txt: line 2 is not UTF-8 text")],
    "generate": [([], "the following arguments are required"),
                 (["MISSING", "--prompt", "x"], "does not exist"),
                 (["EMPTY", "--prompt", "x"], "neither a Hugging Face checkpoint"),
                 (["HF", "--prompt", "x", "--temperature", "-1"], "temperature must be a finite number >= 0"),
                 (["HF", "--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
                 (["HF", "--prompt", "x", "--top-k", "-3"], "top_k must be an integer >= 0"),
                 (["HF", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                 (["HF", "--prompt", "", "--max-new-tokens", "2"], "encodes to zero tokens"),
                 (["HF", "--prompt", "x", "--device", "nonsense"], "--device: "),
                 (["HF", "--prompt", "x", "--device", "mps"], "MPS (Apple GPU) is not available"),
                 (["HF", "--prompt", "x", "--max-new-tokens", "1000"], "together more than the model's window of 256"),
                 (["HF", "--prompt", "x", "--seed", str(2**64)], "seed must be an integer in [0, 2**63)"),
                 (["GELU", "--prompt", "x"], "hidden_act='gelu' is not supported"),
                 (["NANHF", "--prompt", "x"], "tensor 'lm_head.weight' holds non-finite values")],
    "serve": [(["MISSING"], "does not exist"),
              (["EMPTY"], "neither a Hugging Face checkpoint"),
              (["HF", "--max-batch", "0"], "--max-batch must be >= 1"),
              (["HF", "--port", "70000"], "--port must be in [0, 65535]"),
              (["HF", "--prefix-cache-gib", "-1"], "--prefix-cache-gib must be >= 0"),
              (["HF", "--memory-fraction", "1.5"], "--memory-fraction must be in (0, 1]"),
              (["HF", "--chat-template", "MISSING/chat.jinja"], "--chat-template"),
              (["HF", "--shutdown-timeout", "-1"], "--shutdown-timeout must be a number of seconds >= 0"),
              (["HF", "--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' does not resolve"),
              (["HF", "--host", "192.0.2.1"], "--host '192.0.2.1' is not an address of this machine")],
    "convert": [(["HF", "HF"], "is the checkpoint being converted"),
                (["MISSING", "OUT"], "does not exist"),
                (["HF", "STRANGER"], "is not empty and is not a Hugging Face checkpoint"),
                (["HF", "OUT", "--max-shard-size", "lots"], "--max-shard-size"),
                (["HF", "OUT", "--dtype", "fp8"], "invalid choice: 'fp8'"),
                (["HF", "HF/copy"], "is inside the checkpoint being converted")],
    "info": [(["MISSING"], "neither a preset"),
             (["EMPTY"], "neither a Hugging Face checkpoint"),
             (["tiny", "--seq-len", "0"], "--seq-len must be >= 1")],
    "eval": [(["MISSING"], "does not exist"),
             (["HF", "--suite", "speed"], "unknown suite(s) speed"),
             (["HF", "--suite", ""], "--suite is empty"),
             (["HF", "--batch-size", "0"], "--batch-size must be >= 1"),
             (["HF", "--suite", "ruler", "--lengths", "4096", "--out", "OUT"], "exceed the model's window"),
             (["HF", "--suite", "bpb", "--text", "TEXT", "--out", "TEXT"], "text.txt is a file, not a directory"),
             (["HF", "--suite", "probes", "--probe-tasks", "nosuch", "--out", "OUT"], "unknown task(s) nosuch"),
             (["HF", "--suite", "bpb", "--max-length", "9999", "--out", "OUT"], "--max-length 9999 exceeds"),
             (["HF", "--suite", "bpb", "--text", "LATIN", "--out", "OUT"], "latin1.txt: line 2 is not UTF-8 text"),
             (["HF", "--suite", "ruler", "--lengths", "128", "--haystack", "LATIN", "--out", "OUT"],
              "latin1.txt is not UTF-8 text")],
    "ladder": [(["MISSING/ladder.json"], "does not exist"),
               (["TEXT"], "is not valid JSON")],
    "scaling": [(["fit", "MISSING/results.jsonl", "--out", "OUT"], "does not exist"),
                (["bogus"], "invalid choice: 'bogus'")],
    "extend": [([], "the following arguments are required"),
               (["MISSING", "--method", "drope", "--seq-len", "512", "--steps", "1", "--out", "OUT"], "does not exist"),
               (["RUN", "--method", "fancy", "--seq-len", "512", "--steps", "1"], "invalid choice: 'fancy'"),
               (["RUN", "--method", "none", "--seq-len", "512", "--out", "OUT"], "give the stage's length once"),
               (["RUN", "--method", "yarn", "--seq-len", "512", "--steps", "1", "--out", "OUT"], "nothing to rescale"),
               (["RUN", "--method", "none", "--seq-len", "512", "--steps", "1", "--out", "RUN/x"], "inside it"),
               (["RUN", "--method", "none", "--seq-len", "512", "--steps", "1", "--out", "OUT", "optim.lr=inf"],
                "optim.lr: expected a finite number"),
               (["RUN", "--method", "none", "--seq-len", "0", "--steps", "1", "--out", "OUT"],
                "--seq-len must be a positive number of tokens, got 0"),
               (["RUN", "--method", "none", "--seq-len", "512", "--train-len", "0", "--steps", "1", "--out", "OUT"],
                "--train-len must be a positive number of tokens, got 0")],
    "longctx-experiment": [(["MISSING/experiment.json"], "does not exist"),
                           (["TEXT"], "is not valid JSON"),
                           (["TEXT", "--max-minutes", "0"], "--max-minutes must be positive"),
                           (["TEXT", "--max-minutes", "nan"], "--max-minutes must be positive, got nan")],
    "sft": [(["HF"], "the following arguments are required: data"),
            (["HF", "CHAT", "model.d_model=64", "--out", "OUT"], "the model is the source checkpoint's"),
            (["HF", "CHAT", "trainer.steps=5", "--out", "OUT"], "derived from sft.epochs"),
            (["HF", "CHAT", "data.truncation=cut", "--out", "OUT"], "data.truncation: expected one of"),
            (["HF", "CHAT", "parallel.cp_degree=2", "--dry-run"], "post-training does not split"),
            (["HF", "MISSING/chat.jsonl", "--out", "OUT"], "chat.jsonl does not exist"),
            (["MISSING", "CHAT", "--out", "OUT"], "does not exist"),
            (["EMPTY", "CHAT", "--out", "OUT"], "neither a Hugging Face checkpoint"),
            (["HF", "CHAT", "--out", "RUN"], "already holds checkpoints"),
            (["HF", "TEXT", "--out", "OUT"], "text.txt line 1: invalid JSON"),
            (["HF", "BADCHAT", "--out", "OUT"], "badchat.jsonl line 2: the conversation has no assistant turn"),
            (["HF", "CHAT", "--chat-template", "MISSING/t.jinja", "--out", "OUT"], "neither a file nor a Jinja"),
            (["HF", "CHAT", "--chat-template", "{% for %}", "--out", "OUT"], "chat template does not parse"),
            (["HF", "LATINCHAT", "--out", "OUT"], "latinchat.jsonl line 2 is not UTF-8 text"),
            (["HF", "CHAT", "sft.seq_len=0", "--out", "OUT"], "sft.seq_len must be positive, got 0"),
            (["NANHF", "CHAT", "--out", "OUT"], "tensor 'lm_head.weight' holds non-finite values")],
    "dpo": [(["HF", "PAIRS", "dpo.loss=ipo", "--out", "OUT"], "dpo.loss: expected one of dpo, dpo_norm"),
            (["HF", "PAIRS", "dpo.beta=0", "--out", "OUT"], "dpo.beta must be positive"),
            (["HF", "PAIRS", "trainer.loss_chunk_tokens=64", "--out", "OUT"], "DPO needs every token's"),
            (["HF", "MISSING/pairs.jsonl", "--out", "OUT"], "pairs.jsonl does not exist"),
            (["HF", "CHAT", "--out", "OUT"], "chat.jsonl line 1: missing 'chosen'"),
            (["HF", "SAMEPAIR", "--out", "OUT"], "same.jsonl line 2: 'chosen' and 'rejected' are identical")],
}


@pytest.fixture(scope="module")
def places(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("places")
    hf, run = tiny_checkpoints
    (root / "empty").mkdir()
    (root / "stranger").mkdir()
    (root / "stranger" / "notes.txt").write_text("mine")
    (root / "text.txt").write_text("the cat sat on the mat. " * 20)
    turn = [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "sat"}]
    pair = {"prompt": "the cat?", "chosen": "sat", "rejected": "mat"}
    for name, records in (("chat", [{"messages": turn}] * 4), ("badchat", [{"messages": turn}, {"messages": turn[:1]}]),
                          ("pairs", [pair] * 4), ("same", [pair, {**pair, "rejected": "sat"}])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "latin1.txt").write_bytes("ok\nna\u00efve\n".encode("latin-1"))
    (root / "latinchat.jsonl").write_bytes((json.dumps({"messages": turn}) + "\n").encode() +
                                          json.dumps({"messages": turn}).replace("sat", "s\u00e4t").encode("latin-1"))
    variants = {"gelu": {"hidden_act": "gelu"}, "nanhf": {}}
    for name, settings in variants.items():
        shutil.copytree(hf, root / name)
        (root / name / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()),
                                                             **settings}))
    weights = load_file(root / "nanhf" / "model.safetensors")
    weights["lm_head.weight"][0, 0] = float("nan")
    save_file(weights, root / "nanhf" / "model.safetensors")
    return {"HF": str(hf), "RUN": str(run), "LATIN": str(root / "latin1.txt"),
            "LATINCHAT": str(root / "latinchat.jsonl"), "GELU": str(root / "gelu"),
            "NANHF": str(root / "nanhf"), "TEXT": str(root / "text.txt"), "EMPTY": str(root / "empty"),
            "STRANGER": str(root / "stranger"), "MISSING": str(root / "missing"), "OUT": str(root / "out"),
            "CHAT": str(root / "chat.jsonl"), "BADCHAT": str(root / "badchat.jsonl"),
            "PAIRS": str(root / "pairs.jsonl"), "SAMEPAIR": str(root / "same.jsonl")}


def _fill(argv: list[str], places: dict) -> list[str]:
    """Placeholders replaced, also after the '=' of an override (``data.path=TEXT``)."""
    out = []
    for a in argv:
        head, eq, a = a.rpartition("=")
        for key, value in places.items():
            if a == key or a.startswith(key + "/"):
                a = value + a[len(key):]
        out.append(head + eq + a)
    return out


def test_every_command_has_bad_inputs():
    assert set(BAD_INPUTS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_inputs_give_one_line_and_a_nonzero_exit(command, places, hash_tree, capsys):
    users = {k: hash_tree(places[k]) for k in ("HF", "RUN", "TEXT", "STRANGER")}
    cases = BAD_INPUTS[command] + [(["--no-such-flag"], f"(see olmo-hybrid {command} --help)")]
    for argv, phrase in cases:
        accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
        if command == "generate" and "--device" in argv and accelerator:
            continue
        rc = main([command, *_fill(argv, places)])
        out = capsys.readouterr()
        assert rc in (1, 2), (argv, rc, out.err)
        assert out.err.count("\n") == 1 and out.err.startswith(f"olmo-hybrid {command}: error: "), (argv, out.err)
        assert phrase in out.err, (argv, out.err)
        assert "Traceback" not in out.err + out.out
    assert {k: hash_tree(places[k]) for k in users} == users  # nothing the user had was touched
    assert not os.path.exists(places["OUT"])  # and nothing was written for a refused command


def test_serve_refuses_a_port_another_process_holds_before_loading(places, capsys):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", places["HF"], "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"olmo-hybrid serve: error: --port {port}: another process is listening on 127.0.0.1:{port}\n"


def test_debug_shows_the_traceback(places, monkeypatch, capsys):
    assert main(["info", places["EMPTY"], "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CheckpointError" in err
    assert err.splitlines()[-1].startswith("olmo-hybrid info: error: ")
    monkeypatch.setenv("OLMO_HYBRID_DEBUG", "1")
    assert main(["info", places["EMPTY"]]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_terminal_sees_one_line(places):
    """Real processes: the package entry point and ``python -m olmo_hybrid.train``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OLMO_HYBRID_DEBUG", None)
    plain = subprocess.run([sys.executable, "-m", "olmo_hybrid", "info", places["EMPTY"]], capture_output=True,
                           text=True, env=env, timeout=120)
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr == f"olmo-hybrid info: error: {places['EMPTY']} is neither a Hugging Face checkpoint " \
                           "(config.json + *.safetensors) nor a training run directory\n"
    module = subprocess.run([sys.executable, "-m", "olmo_hybrid.train", "--bogus"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert module.returncode == 2
    assert module.stderr == "olmo-hybrid train: error: unrecognized arguments: --bogus (see olmo-hybrid train --help)\n"


# --------------------------------------------------------------------------------------------------
# A full disk while writing a prepared dataset or evaluation results


def test_full_disk_during_prepare_keeps_the_previous_dataset(places, tmp_path, hash_tree, file_size_limit, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", places["TEXT"], "--out", str(out), "--bpe-vocab", "300", "--val-fraction", "0",
                 "--quiet"]) == 0
    capsys.readouterr()
    before = hash_tree(tmp_path)
    with file_size_limit(2048):
        rc = main(["prepare", places["TEXT"], "--out", str(out), "--bpe-vocab", "300", "--val-fraction", "0",
                   "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert f"could not write the prepared dataset {out}: file too large" in err and "is unchanged" in err
    assert hash_tree(tmp_path) == before  # the old dataset as it was, no temporary directory left


def test_full_disk_while_writing_eval_results(places, tmp_path, hash_tree, file_size_limit, capsys):
    out = tmp_path / "results"
    argv = ["eval", places["HF"], "--suite", "bpb", "--text", places["TEXT"], "--out", str(out), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    before = hash_tree(out)
    with file_size_limit(64):
        rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "could not write" in err and "file too large" in err, err
    assert hash_tree(out) == before

    pytest.importorskip("matplotlib")
    from olmo_hybrid.errors import WriteError
    from olmo_hybrid.eval.report import plot_score_vs_length

    plot = plot_score_vs_length({"a": {8: 1.0, 16: 2.0}}, out / "plot.png", "t")
    before = hash_tree(out)
    with file_size_limit(64), pytest.raises(WriteError, match=f"could not write {plot}: file too large"):
        plot_score_vs_length({"a": {8: 3.0, 16: 1.0}}, plot, "t")
    assert hash_tree(out) == before
