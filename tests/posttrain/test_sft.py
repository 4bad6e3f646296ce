"""SFT: the masked loss by hand, packed conversations kept apart, exact resume in a fresh process, the CLI
and generate --chat."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from olmo_hybrid.cli import main
from olmo_hybrid.data.chat import ChatTemplate
from olmo_hybrid.model import HybridLM
from olmo_hybrid.posttrain.config import SFTConfig, build_posttrain_config, with_source_model
from olmo_hybrid.posttrain.examples import tokenize_conversations
from olmo_hybrid.posttrain.packing import pack_conversations
from olmo_hybrid.posttrain.source import prepare_source
from olmo_hybrid.posttrain.trainer import SFTTrainer
from olmo_hybrid.train.metrics import read_metrics

from .conftest import conversation, crash_then_resume, quiet

OVERRIDES = ["data.seq_len=96", "data.batch_size=2", "optim.lr=3e-3", "trainer.eval_interval=3",
             "trainer.log_interval=1", "trainer.save_interval=2", "trainer.device=cpu", "sft.max_steps=6"]


def sft_config(data, *extra):
    return build_posttrain_config(SFTConfig, None, [*OVERRIDES, f"data.path={data}", *extra])


@pytest.mark.parametrize("pattern", ["GA", "GMA"])
def test_packed_conversations_never_see_each_other(source, pattern):
    """GDN state, Mamba2 state, short convolutions and attention all restart at each conversation of a row."""
    src = prepare_source(source, log=quiet)
    if pattern == "GA":  # the source's own weights
        model = HybridLM(src.config, init=False)
        model.load_state_dict(src.state_dict)
    else:
        torch.manual_seed(1)
        model = HybridLM(dataclasses.replace(src.config, n_layers=3, layer_pattern=pattern, mamba_head_dim=16,
                                             mamba_state_size=16))
    model.eval()
    chat = ChatTemplate(src.tokenizer)
    seqs, _ = tokenize_conversations([(str(i), conversation(i)) for i in range(3)], chat, 128, "error")
    rows = pack_conversations(seqs, 128, 1, None)
    assert rows["input_ids"].shape[0] == 1 and set(rows["doc_ids"][0].tolist()) == {0, 1, 2, 3}  # 3 + padding
    ids, docs = torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["doc_ids"])
    with torch.no_grad():
        packed = model(ids, doc_ids=docs)[0]
        unmasked = model(ids)[0]
        pos = 0
        for s in seqs:
            alone = model(torch.from_numpy(s.ids)[None])[0]
            torch.testing.assert_close(packed[pos:pos + len(s.ids)], alone, atol=1e-5, rtol=1e-5)
            pos += len(s.ids)
    # Without document boundaries the later conversations would see the earlier ones (GDN state and attention).
    assert (unmasked[len(seqs[0].ids):pos] - packed[len(seqs[0].ids):pos]).abs().max() > 1e-3


def _hand_cross_entropy(trainer, batches) -> tuple[float, int]:
    """Summed cross-entropy (float64) and count of the assistant tokens of ``batches``, each conversation run
    alone, its assistant tokens found by encoding the turns one by one."""
    tok, model = trainer.tokenizer, trainer.model
    nats, count = 0.0, 0
    for batch in batches:
        for row_ids, row_docs in zip(batch["input_ids"], batch["doc_ids"]):
            for d in row_docs.unique():
                ids = row_ids[row_docs == d]
                if (ids == trainer.pad_id).all():
                    continue
                text = tok.decode(ids.tolist())
                user, reply = text.split("<|im_start|>assistant\n")
                assert tok.encode(user + "<|im_start|>assistant\n", allow_special=True) + \
                    tok.encode(reply, allow_special=True) == ids.tolist()
                first = len(tok.encode(user + "<|im_start|>assistant\n", allow_special=True))
                with torch.no_grad():
                    logits = model(ids[None])[0].double()
                targets = ids[first:]
                nats += F.cross_entropy(logits[first - 1:-1], targets, reduction="sum").item()
                count += len(targets)
    return nats, count


@pytest.mark.parametrize("seq_len, packed", [(96, True), (32, False)])
def test_sft_loss_is_the_masked_cross_entropy_of_assistant_tokens(source, sft_file, tmp_path, seq_len, packed):
    """A micro-batch's loss, and a step's over two accumulated micro-batches, equal the mean cross-entropy of
    their assistant tokens computed by hand; with rows of several conversations and of one."""
    cfg = sft_config(sft_file, "data.batch_size=4", f"data.seq_len={seq_len}", "trainer.grad_accum=2")
    src = prepare_source(source, log=quiet)
    trainer = SFTTrainer(with_source_model(cfg, src.config), tmp_path, src, log=quiet)
    assert (len(trainer.train_rows["input_ids"]) < trainer.train_report.kept) == packed  # rows of several, or one
    state = trainer.loader.state_dict()
    batches = [trainer.loader.next_batch() for _ in range(2)]
    n = int((batches[0]["labels"] != -100).sum())
    loss, ce, _ = trainer._loss(batches[0], float(n))
    nats, count = _hand_cross_entropy(trainer, batches[:1])
    assert count == n
    assert loss.item() == pytest.approx(nats / count, rel=1e-5) and ce.item() == pytest.approx(nats, rel=1e-5)
    nats, count = _hand_cross_entropy(trainer, batches)
    trainer.loader.load_state_dict(state)
    out = trainer.train_step()  # the step's loss: both micro-batches' tokens, before the update
    assert out.loss.item() == pytest.approx(nats / count, rel=1e-5)


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


def test_sft_resumes_exactly_in_a_fresh_process(source, sft_file, tmp_path):
    cfg = sft_config(sft_file)
    src = prepare_source(source, log=quiet)
    straight = SFTTrainer(with_source_model(cfg, src.config), tmp_path / "straight", src, log=quiet)
    straight.fit()
    expected = _losses(tmp_path / "straight")
    assert len(expected) == 6 and expected[-1] < expected[0]
    first = SFTTrainer(with_source_model(cfg, src.config), tmp_path / "run", src, log=quiet)
    crash_then_resume(first, "sft", source, sft_file, tmp_path / "run", OVERRIDES)
    assert _losses(tmp_path / "run") == expected  # bit for bit
    config = json.loads((tmp_path / "run" / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == src.tokenizer.chat_template


def test_cli_exports_a_chat_model_and_generate_chat_stops_at_the_turn_end(source, sft_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sft", str(source), sft_file, "--out", str(out), *OVERRIDES, "sft.max_steps=2"]) == 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(out / "hf")
    assert hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                  add_generation_prompt=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    capsys.readouterr()
    assert main(["generate", str(out / "hf"), "--prompt", "first of: fig", "--chat", "--temperature", "0",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("first of: fig\n") and "<|im" not in printed
    # Bad inputs (one line naming the field or line): tests/test_cli_errors.py
