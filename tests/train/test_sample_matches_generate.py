"""One generation stack: the trainer's end-of-run sample, ``model.generate`` and ``olmo-hybrid generate`` give the
same tokens for the same checkpoint, prompt, settings and seed."""

from __future__ import annotations

import torch

from olmo_hybrid.cli import main
from olmo_hybrid.checkpoint import load_model_and_tokenizer
from olmo_hybrid.train.trainer import Trainer

from .conftest import make_config, quiet

PROMPT, NEW, SEED, TEMPERATURE, TOP_K = "ROMEO:\n", 24, 5, 1.3, 40


def test_trainer_sample_generate_and_cli_give_the_same_tokens(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = make_config(corpus_dir, "trainer.export_hf=true", f"trainer.sample_tokens={NEW}",
                      f"trainer.sample_temperature={TEMPERATURE}", f"trainer.sample_top_k={TOP_K}",
                      f"trainer.sample_prompt={PROMPT}", f"trainer.seed={SEED}")
    result = Trainer(cfg, run, log=quiet).fit()

    model, tok = load_model_and_tokenizer(run)  # the exported fp32 weights
    prompt = torch.tensor([tok.encode(PROMPT)])
    kwargs = dict(temperature=TEMPERATURE, top_k=TOP_K, top_p=1.0, seed=SEED)
    tokens = model.generate(prompt, NEW, **kwargs)[0, prompt.shape[1]:].tolist()
    assert result.sample == tok.decode(prompt[0].tolist() + tokens)
    # A different seed draws different tokens: the seed, not a global generator, decides.
    assert model.generate(prompt, NEW, **{**kwargs, "seed": SEED + 1})[0, prompt.shape[1]:].tolist() != tokens

    # The CLI stops at EOS (the trainer's sample runs the full length): compare up to it.
    with_eos = model.generate(prompt, NEW, eos_token_id=tok.eos_token_id, **kwargs)[0, prompt.shape[1]:].tolist()
    cut = with_eos[:with_eos.index(tok.eos_token_id)] if tok.eos_token_id in with_eos else with_eos
    assert cut == tokens[:len(cut)]
    capsys.readouterr()  # the training log
    assert main(["generate", str(run), "--prompt", PROMPT, "--seed", str(SEED), "--temperature", str(TEMPERATURE),
                 "--top-k", str(TOP_K), "--top-p", "1.0", "--max-new-tokens", str(NEW), "--device", "cpu"]) == 0
    assert capsys.readouterr().out == PROMPT + tok.decode(cut) + "\n"
