"""The ladder end to end on the CPU: killed mid-way, resumed, no point trained twice; decay branches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from olmo_hybrid.cli import main
from olmo_hybrid.scaling.jobs import RESULTS
from olmo_hybrid.scaling.ladder import load_ladder, plan_ladder
from olmo_hybrid.scaling.results import read_results
from olmo_hybrid.scaling.runner import lock_output
from olmo_hybrid.train import read_metrics

from .conftest import write_ladder


def _keys(path):
    return [(r["arch"], r["size"], r["seed"], r["budget"]) for r in (p.record for p in read_results(path))]


def _wait_for_lines(path, n, proc, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, f"the ladder exited early ({proc.returncode})"
        time.sleep(0.05)
    raise AssertionError(f"no {n} result lines within {timeout} s")


def _resume(config, out, capsys, timeout=30.0):
    """Run the ladder in this process once the killed one's workers have released the output lock."""
    end = time.time() + timeout
    while True:
        rc = main(["ladder", str(config), "--out", str(out), "--report-interval", "600"])
        captured = capsys.readouterr()
        if rc != 1 or "in use by another ladder" not in captured.err or time.time() > end:
            return rc, captured
        time.sleep(0.2)


def test_killed_ladder_resumes_without_training_a_point_twice(corpus_dir, tmp_path, capsys):
    config = write_ladder(tmp_path / "ladder.json", corpus_dir)
    out = tmp_path / "out"
    results = out / RESULTS
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "olmo_hybrid", "ladder", str(config), "--out", str(out),
                             "--parallel", "2", "--report-interval", "600"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_lines(results, 1, proc)
    proc.send_signal(signal.SIGKILL)  # the ladder process; its workers follow it (parent-death signal)
    log = proc.communicate(timeout=30)[0].decode()
    assert "2 worker processes" in log
    before = results.read_bytes()
    done_before = _keys(results)
    assert 1 <= len(done_before) < 8
    with open(results, "ab") as f:  # and a writer killed mid-line
        f.write(b'{"arch": "hybrid-half", "pattern": "G')

    rc, captured = _resume(config, out, capsys)
    assert rc == 0, captured.out + captured.err
    assert f"{len(done_before)} of 8 points done" in captured.out
    assert f"line {len(done_before) + 1} is incomplete" in captured.out
    text = results.read_bytes()
    assert text.endswith(b"\n") and text.count(b"\n") == 8  # the torn line was cut before the first append
    keys = _keys(results)
    assert len(keys) == 8 and len(set(keys)) == 8  # every point once: none trained twice
    assert results.read_bytes().startswith(before)  # the points made before the kill are untouched
    assert {k[0] for k in keys} == {"hybrid-half", "transformer"} and {k[3] for k in keys} == {0.5, 1.0}

    # A third call finds nothing to do and trains nothing.
    rc, captured = _resume(config, out, capsys)
    assert rc == 0 and "8 of 8 points done; 0 runs to train" in captured.out
    assert _keys(results) == keys


def test_branches_continue_the_stable_phase_and_record_the_point(corpus_dir, tmp_path, capsys):
    config = write_ladder(tmp_path / "ladder.json", corpus_dir, sizes=["t48"], architectures=["transformer"])
    out = tmp_path / "out"
    assert main(["ladder", str(config), "--out", str(out), "--report-interval", "600"]) == 0
    plan = plan_ladder(load_ladder(config))
    (run,) = plan.runs
    records = {p.record["budget"]: p.record for p in read_results(out / RESULTS)}
    run_dir = out / "runs" / run.id
    stable = {r["step"]: r for r in read_metrics(run_dir / "stable" / "metrics.jsonl")}
    for point in run.points:
        rec = records[point.budget]
        decay = read_metrics(run_dir / f"decay-{point.budget:g}x" / "metrics.jsonl")
        assert [r["step"] for r in decay] == list(range(point.branch_step + 1, point.steps + 1))
        # The branch's first step sees the stable phase's weights, optimizer state, data and learning rate.
        first = decay[0]
        if point is not run.points[-1]:  # the stable phase went on past this branch step
            assert first["loss"] == stable[point.branch_step + 1]["loss"]
        assert first["lr"] < run.lr == stable[point.branch_step]["lr"] and decay[-1]["lr"] == 0.0
        assert rec["loss"] == decay[-1]["val_loss"] and rec["loss_stable"] == stable[point.branch_step]["val_loss"]
        assert rec["tokens"] == point.steps * 4 * 16 and rec["params_nonemb"] == run.model.num_params(embeddings=False)
        assert rec["epochs"] == rec["tokens"] / plan.train_tokens and rec["model"]["d_model"] == 48
        assert not (run_dir / f"decay-{point.budget:g}x" / "checkpoints").exists()  # cleaned up after the point
    assert records[1.0]["loss"] < records[0.5]["loss"]
    capsys.readouterr()
    assert main(["ladder", str(config), "--out", str(out), "--status"]) == 0
    assert "2/2 points done" in capsys.readouterr().out
    assert json.loads((out / "ladder.json").read_text())["data"] == str(corpus_dir.absolute())


def test_deadline_and_lock(corpus_dir, tmp_path, capsys):
    config = write_ladder(tmp_path / "ladder.json", corpus_dir)
    out = tmp_path / "out"
    assert main(["ladder", str(config), "--out", str(out), "--max-minutes", "0.5", "--report-interval", "600"]) == 3
    assert "stopped at the time limit: 4 runs not finished" in capsys.readouterr().out  # none starts in the last minute
    assert not (out / RESULTS).exists()
    fd = lock_output(out)  # another ladder holds the directory
    try:
        assert main(["ladder", str(config), "--out", str(out)]) == 1
        assert f"{out} is in use by another ladder process" in capsys.readouterr().err
    finally:
        os.close(fd)
