"""``olmo-hybrid generate`` on the engine: the streamed text is the engine's text, greedy equals full forwards."""

import pytest
import torch
from serve_util import greedy_by_full_forwards, save_tiny_checkpoint

from olmo_hybrid.cli import main

_checkpoint = save_tiny_checkpoint


def test_generate_streams_the_greedy_continuation(tmp_path, capsys):
    model, tok = _checkpoint(tmp_path)
    prompt = "the cat"
    assert main(["generate", str(tmp_path), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12",
                 "--device", "cpu"]) == 0
    want = greedy_by_full_forwards(model, torch.tensor(tok.encode(prompt)), 12)
    if tok.eos_token_id in want:
        want = want[:want.index(tok.eos_token_id)]
    assert capsys.readouterr().out == prompt + tok.decode(want) + "\n"


def test_generate_cuts_at_a_stop_string_without_printing_it(tmp_path, capsys):
    _checkpoint(tmp_path)
    args = ["generate", str(tmp_path), "--prompt", "the dog", "--seed", "3", "--max-new-tokens", "20",
            "--temperature", "1.5", "--device", "cpu"]
    assert main(args) == 0
    full = capsys.readouterr().out[len("the dog"):-1]
    stop = full[3:5]  # a stop string inside the sampled text (same seed: same samples)
    assert len(full) > 5 and stop
    assert main(args + ["--stop", stop]) == 0
    assert capsys.readouterr().out == "the dog" + full[:full.find(stop)] + "\n"


def test_cli_and_generate_refuse_the_same_sampling_settings(tmp_path, capsys):
    model, tok = _checkpoint(tmp_path)
    for flag, value in [("--temperature", "-0.5"), ("--temperature", "nan"), ("--top-p", "0"), ("--top-p", "1.5"),
                        ("--top-p", "nan"), ("--top-k", "-1")]:
        name = flag[2:].replace("-", "_")
        number = int(value) if name == "top_k" else float(value)
        with pytest.raises(ValueError, match=f"SamplingParams.{name} must be"):
            model.generate(torch.tensor([tok.encode("the cat")]), 4, **{name: number})
        # The CLI reports the same error as one line and a non-zero exit code.
        assert main(["generate", str(tmp_path), "--prompt", "the cat", "--device", "cpu", flag, value]) != 0
        err = capsys.readouterr().err.strip()
        assert f"SamplingParams.{name} must be" in err and "\n" not in err, err
