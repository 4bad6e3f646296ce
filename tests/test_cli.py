"""The lead's subcommands: info, convert and the dispatcher."""

import json

import torch

from olmo_hybrid.cli import main
from olmo_hybrid.config import ModelConfig, model_preset
from olmo_hybrid.model import HybridLM


def test_info_reports_config_figures(capsys):
    assert main(["info", "olmo-hybrid-7b", "--context", "65536", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    cfg = model_preset("olmo-hybrid-7b")
    assert rows["model"]["params_total"] == 7_430_870_688
    # 8 attention layers x K and V x 3840 x 2 bytes x 65536 tokens = 7.5 GiB; 24 fp32 states of 30x96x192.
    assert rows["model"]["inference_bytes_per_sequence"]["kv_cache"] == 8 * 2 * 3840 * 2 * 65536
    assert rows["model"]["inference_bytes_per_sequence"]["gdn_state"] == 24 * 30 * 96 * 192 * 4
    assert rows["all-attention"]["inference_bytes_per_sequence"]["kv_cache"] == 32 * 2 * 3840 * 2 * 65536
    assert rows["model"]["params_non_embedding"] == cfg.num_params(embeddings=False)


def test_info_prints_small_states_in_units_that_show_them():
    from olmo_hybrid.cli.info import human_bytes

    assert human_bytes(4096) == "4.00 KiB"  # a tiny model's GDN state: was "0.00 MiB"
    assert human_bytes(3 * 2**20) == "3.00 MiB"
    assert human_bytes(7.5 * 2**30) == "7.500 GiB"
    assert human_bytes(0) == "0.00 KiB"


def test_convert_normalizes_and_verifies(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=4, n_heads=2, gdn_heads=2, gdn_head_k=8, gdn_head_v=16,
                      mlp_hidden=64, max_seq_len=128)
    HybridLM(cfg).save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "fp32", "--verify"]) == 0
    assert "logits identical" in capsys.readouterr().out
    assert not (tmp_path / "dst" / "tokenizer.json").exists()  # vocab 50 is not dolma2's: no tokenizer guessed


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
