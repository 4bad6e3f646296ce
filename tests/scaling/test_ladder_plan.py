"""Ladder configs and plans: the reference's rules, schedules that branch cleanly, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from olmo_hybrid.cli import main
from olmo_hybrid.config import from_dict, model_preset
from olmo_hybrid.scaling.jobs import RESULTS, check_schedules, done_points, train_config
from olmo_hybrid.scaling.ladder import LadderConfig, LadderError, load_ladder, plan_ladder
from olmo_hybrid.scaling.results import append_result
from olmo_hybrid.train import lr_at

from .conftest import tiny_ladder, write_ladder


def _config(data, **fields) -> LadderConfig:
    return from_dict(LadderConfig, tiny_ladder(data, **fields))


def _plan(data, **fields):
    return plan_ladder(_config(data, **fields))


def test_reference_rules_for_a_micro_size(corpus_dir):
    plan = _plan(corpus_dir, sizes=["micro-128"], architectures=["hybrid"], seq_len=512, recipe={},
                 budgets=[0.5, 1, 2, 4], custom_sizes={})
    (run,) = plan.runs
    n = model_preset("micro-128").with_pattern("GGGA").num_params(embeddings=False) - (4096 - 384) * 128
    assert run.params_nonemb == n and run.model.vocab_size == 384  # the corpus's vocabulary; the LM head counts
    batch_tokens = 327_680 * (n / 108e6) ** (2 / 3)
    assert run.batch_sequences == round(batch_tokens / 512)
    assert run.lr == pytest.approx(0.0047 / 2 * (n / 108e6) ** (-1 / 3))
    assert run.beta2 == 0.99 and run.warmup_steps == round(n / (run.batch_sequences * 512))
    for point, budget in zip(run.points, [0.5, 1, 2, 4]):
        assert point.steps == round(budget * 20 * n / (run.batch_sequences * 512))
        assert point.branch_step == point.steps - round(0.1 * point.steps)
        assert point.tokens == point.steps * run.batch_sequences * 512
        assert point.epochs == point.tokens / plan.train_tokens
    assert len(plan.warnings) == 4 and "sees the training split" in plan.warnings[0]  # a 25k-token corpus


def test_mamba2_architectures_plan_with_their_pattern(corpus_dir):
    plan = _plan(corpus_dir, sizes=["micro-128"], architectures=["hybrid-mamba2", "pure-mamba2"], seq_len=512,
                 recipe={}, budgets=[1], custom_sizes={})
    hybrid, pure = plan.runs
    assert "".join(hybrid.model.layer_types) == "MMMA" and "".join(pure.model.layer_types) == "MMMM"
    assert hybrid.params_nonemb == hybrid.model.num_params(embeddings=False) > 0


def test_branch_schedules_continue_the_stable_phase(corpus_dir):
    plan = _plan(corpus_dir, sizes=["micro-64", "micro-256"], architectures=["transformer"], seq_len=512,
                 recipe={}, budgets=[0.5, 1, 2, 4, 8], custom_sizes={})
    for run in plan.runs:
        for point in run.points:
            check_schedules(plan, run, point)
            stable = train_config(plan, run, point.branch_step, "constant")
            decay = train_config(plan, run, point.steps, "wsd")
            assert stable.optim == decay.optim and stable.data == decay.data and stable.model == decay.model
            lrs = [lr_at(s, point.steps, run.lr, decay.schedule) for s in range(point.steps)]
            assert lrs[:point.branch_step] == [lr_at(s, point.branch_step, run.lr, stable.schedule)
                                               for s in range(point.branch_step)]
            assert all(a > b for a, b in zip(lrs[point.branch_step - 1:], lrs[point.branch_step:]))
            assert lrs[-1] == 0.0


@pytest.mark.parametrize("fields, message", [
    ({"architectures": ["hybrid-half", "retnet"]}, "unknown architecture 'retnet'"),
    ({"sizes": ["t32", "3b"]}, "unknown size '3b'"),
    ({"architectures": ["hybrid-eighth"]}, "'hybrid-eighth' .* does not fit size 't32'"),
    ({"budgets": [0.05]}, r"budget 0.05x of hybrid-half/t32: 1 steps leave 0 before the decay"),
    ({"custom_sizes": {"t32": {"d_model": "wide"}}, "sizes": ["t32"]}, "custom_sizes.t32.*d_model"),
    ({"data": "/nonexistent/corpus"}, "data: dataset directory /nonexistent/corpus does not exist"),
])
def test_plan_errors_name_the_problem(corpus_dir, fields, message):
    with pytest.raises(LadderError, match=message):
        plan_ladder(from_dict(LadderConfig, {**tiny_ladder(corpus_dir), **fields}))


@pytest.mark.parametrize("fields, message", [
    ({"train": ["optim.lr=1e-3"]}, "train override 'optim.lr=1e-3': the ladder sets optim.lr"),
    ({"train": ["schedule.name=cosine"]}, "the ladder sets schedule.name"),
    ({"budgets": [1, 1]}, r"budgets: \[1.0, 1.0\] lists a value twice"),
    ({"recipe": {"decay_fraction": 1.5}}, r"recipe.decay_fraction must be in \(0, 1\)"),
    ({"sizes": []}, "sizes: give at least one"),
])
def test_config_errors(corpus_dir, fields, message):
    with pytest.raises(LadderError, match=message):
        _config(corpus_dir, **fields)


def test_config_file_errors(corpus_dir, tmp_path):
    path = tmp_path / "ladder.json"
    path.write_text(json.dumps({**tiny_ladder(corpus_dir), "sizez": ["t32"]}))
    with pytest.raises(LadderError, match="unknown config field 'sizez'"):
        load_ladder(path)
    path.write_text(json.dumps({"sizes": ["t32"], "architectures": ["hybrid"]}))
    with pytest.raises(LadderError, match="ladder.json: missing field\\(s\\) data"):
        load_ladder(path)
    write_ladder(path, corpus_dir)
    assert load_ladder(path, ["recipe.decay_fraction=0.05"]).recipe.decay_fraction == 0.05


def test_results_made_with_other_settings_are_refused(corpus_dir, tmp_path):
    plan = _plan(corpus_dir)
    run, point = plan.runs[0], plan.runs[0].points[0]
    record = {"arch": run.arch, "size": run.size, "seed": run.seed, "budget": point.budget,
              "fingerprint": point.fingerprint}
    append_result(tmp_path / RESULTS, record)
    assert done_points(plan, tmp_path) == {run.key(point): 1}
    changed = _plan(corpus_dir, recipe={**tiny_ladder(corpus_dir)["recipe"], "fixed_lr": 0.001})
    with pytest.raises(LadderError, match=f"{RESULTS} line 1: point {run.arch}/{run.size}/seed 0/0.5x was made "
                                          "with other settings"):
        done_points(changed, tmp_path)


def test_plan_command_prints_flops_and_gpu_time(corpus_dir, tmp_path, capsys):
    path = write_ladder(tmp_path / "ladder.json", corpus_dir)
    assert main(["ladder", str(path), "--plan", "--mfu", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "2 sizes x 2 architectures x 1 seeds x 2 budgets = 8 points" in out
    assert "GPU-hours at 10% MFU of 989 TFLOP/s" in out and "transformer__t48__s0" in out
    assert main(["ladder", str(path), "--archs", "mamba"]) == 2
    assert "--archs: mamba not in the config" in capsys.readouterr().err
    assert main(["ladder", str(path), "architectures=retnet"]) == 2
    assert "unknown architecture 'retnet'" in capsys.readouterr().err


def test_plan_shows_only_the_runs_archs_and_sizes_select(corpus_dir, tmp_path, capsys):
    """--plan ignored --archs / --sizes: it printed every run (an unknown name too), not what the ladder would
    train."""
    path = write_ladder(tmp_path / "ladder.json", corpus_dir)
    assert main(["ladder", str(path), "--plan", "--archs", "transformer", "--sizes", "t48"]) == 0
    out = capsys.readouterr().out
    runs = [line.split()[0] for line in out.splitlines() if "__s0" in line]
    assert runs == ["transformer__t48__s0"]
    assert "1 sizes x 1 architectures x 1 seeds x 2 budgets = 2 points" in out
    assert main(["ladder", str(path), "--plan", "--sizes", "t4096"]) == 2
    assert "--sizes: t4096 not in the config" in capsys.readouterr().err


def test_micro_sizes_follow_the_ladder_rule_and_span_8x():
    from olmo_hybrid.config import _ladder

    for d in (64, 128, 192, 256):
        cfg = model_preset(f"micro-{d}")
        assert cfg == dataclasses.replace(_ladder(d, 4, d // 64), vocab_size=4096)
    for pattern in ("GGGA", "A", "G"):
        n = [model_preset(f"micro-{d}").with_pattern(pattern).num_params(embeddings=False) for d in (64, 256)]
        assert n[1] / n[0] >= 8


def test_a_whole_last_result_line_without_newline_counts_as_done(corpus_dir, tmp_path):
    """A results file whose last point lacks its newline (edited by hand) had that point dropped as torn: the
    ladder trained it again and cut the line."""
    plan = _plan(corpus_dir)
    run = plan.runs[0]
    lines = [json.dumps({"arch": run.arch, "size": run.size, "seed": run.seed, "budget": p.budget,
                         "fingerprint": p.fingerprint}) for p in run.points]
    (tmp_path / RESULTS).write_text("\n".join(lines))
    assert done_points(plan, tmp_path, log=lambda m: pytest.fail(m)) == {run.key(p): i + 1
                                                                        for i, p in enumerate(run.points)}


def test_a_diverged_branch_is_a_clear_error_and_records_nothing(corpus_dir, tmp_path, monkeypatch):
    """A branch ending with a non-finite validation loss failed with json's 'Out of range float values are not
    JSON compliant'; now the error names the run, the budget and the metrics file, and nothing is appended."""
    from types import SimpleNamespace

    import olmo_hybrid.checkpoint
    from olmo_hybrid.scaling import jobs

    plan = _plan(corpus_dir)
    run, point = plan.runs[0], plan.runs[0].points[0]
    monkeypatch.setattr(olmo_hybrid.checkpoint, "list_checkpoints",
                        lambda d: [SimpleNamespace(step=point.branch_step, path=d / "checkpoints" / "x")])
    monkeypatch.setattr(jobs, "_phase", lambda *a: SimpleNamespace(steps=point.steps, final_val_loss=float("nan")))
    with pytest.raises(LadderError, match=rf"{run.id} 0.5x: validation loss nan after the decay: the run diverged "
                                          rf"\(see .*decay-0.5x/metrics.jsonl\); no point recorded"):
        jobs.run_job(plan, run, tmp_path, log=lambda *_: None)
    assert not (tmp_path / RESULTS).exists()


@pytest.mark.parametrize("args, message", [
    (["--report-interval", "0"], "--report-interval must be positive seconds, got 0.0"),
    (["--max-minutes", "-1"], r"--max-minutes must be >= 0 \(0: no limit\), got -1.0"),
    (["--plan", "--mfu", "0"], r"--mfu must be in \(0, 1\], got 0.0"),
    (["--plan", "--peak-tflops", "nan"], "--peak-tflops must be positive, got nan"),
    (["--sizes", ","], "--sizes: give at least one name"),
    (["--parallel", "0"], "--parallel must be at least 1, got 0"),
    (["--archs", "mamba"], "--archs: mamba not in the config"),
    (["budgets=1x"], "budgets.*expected a number, got '1x'"),
])
def test_ladder_command_bad_arguments_are_one_line(corpus_dir, tmp_path, capsys, args, message):
    """Before: a report interval of 0 printed progress lines in a busy loop, a negative time limit meant none,
    an MFU of 0 gave 'nan GPU-hours', an empty --sizes meant every size."""
    import re

    path = write_ladder(tmp_path / "ladder.json", corpus_dir)
    assert main(["ladder", str(path), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("olmo-hybrid ladder: error:") and re.search(message, err[0]), err
    assert not (tmp_path / "out" / RESULTS).exists()
