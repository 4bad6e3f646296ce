"""``olmo-hybrid generate`` on the engine: the streamed text is the engine's text, greedy equals full forwards."""

import pytest
import torch
from serve_util import greedy_by_full_forwards

from olmo_hybrid.cli import main
from olmo_hybrid.config import ModelConfig
from olmo_hybrid.data.tokenizer import train_bpe
from olmo_hybrid.model import HybridLM


def _checkpoint(tmp_path):
    tok = train_bpe(["the cat sat on the mat, the dog sat on the log"] * 4, vocab_size=270)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=272, d_model=32, n_layers=4, n_heads=2, gdn_heads=2, gdn_head_k=8, gdn_head_v=16,
                      mlp_hidden=64, max_seq_len=128, layer_pattern="GGGA")
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked logits: a varied continuation rather than one repeated token
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    return model, tok


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
