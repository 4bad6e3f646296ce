"""Post-training demonstration on a CPU: SFT, then DPO, of the tiny pretrained hybrid on a synthetic task.

    python benchmarks/posttrain_demo_cpu.py [--source runs/tiny] [--out runs/posttrain-demo] [--quick]

The task is generated here: questions about a short list of common words from the pretraining corpus, each
with one correct answer in a fixed format (the word itself, or two words), in four kinds:

    Which word comes first: night love sword king?      -> night
    Which word comes last: night love sword king?       -> king
    Which word comes second: night love sword king?     -> love
    Swap the two words: night love                      -> love night

1. The source is the tiny recipe's run (``olmo-hybrid train``, the quick start: it writes ``runs/tiny``; when
   absent it is trained first, ~5 minutes). Its 4,096-id tokenizer has no ``<|im_start|>`` / ``<|im_end|>``:
   post-training adds both and grows the embedding (see ``olmo_hybrid/posttrain/source.py``).
2. SFT on 2,000 conversations (``olmo-hybrid sft``'s code path, recipe knobs changed for a 6M-parameter model
   and a few minutes: lr 2e-3 instead of 2.5e-5, 3 epochs, 4 rows of 256 tokens per step).
3. DPO, one epoch on 1,000 new questions: chosen = the correct answer, rejected = the SFT model's own greedy
   reply when it was wrong, else another word of the question's list (dpo_norm, beta 5; lr 5e-5 instead of
   1e-6, rows of 128 tokens).
4. Exact match of greedy replies on 400 held-out questions (new draws: a question may repeat a training one
   by chance, the word lists are 4 of 24 words) and the margin log p(correct) - log p(wrong word) on 400
   held-out pairs, after each stage. The summary goes to stdout and ``OUT/summary.json``.

``--quick`` checks that the pipeline runs end to end in a minute or two (a tenth of the examples, a few steps of
each stage); its numbers say nothing about the method.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

WORDS = ("night love sword king queen heart death blood crown hand eyes world "
         "time soul lord father mother son friend honour grace fear word life").split()
KINDS = ("first", "last", "second", "swap")


def question(rng: random.Random) -> tuple[str, str, list[str]]:
    """``(question, answer, wrong answers)``."""
    kind = rng.choice(KINDS)
    if kind == "swap":
        a, b = rng.sample(WORDS, 2)
        return f"Swap the two words: {a} {b}", f"{b} {a}", [f"{a} {b}", a, b]
    words = rng.sample(WORDS, 4)
    answer = {"first": words[0], "last": words[-1], "second": words[1]}[kind]
    return f"Which word comes {kind}: {' '.join(words)}?", answer, [w for w in words if w != answer]


def conversations(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        q, a, _ = question(rng)
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load(path):
    from olmo_hybrid.data.chat import ChatTemplate
    from olmo_hybrid.model import HybridLM
    from olmo_hybrid.posttrain.source import prepare_source

    src = prepare_source(path, log=lambda _: None)
    model = HybridLM(src.config, init=False)
    model.load_state_dict(src.state_dict)
    return model.eval(), ChatTemplate(src.tokenizer)


def judge(path, held_out, held_pairs) -> dict:
    from olmo_hybrid.posttrain.evaluate import exact_match, greedy_replies, preference_margin

    model, chat = load(path)
    replies = greedy_replies(model, chat, [q for q, _, _ in held_out])
    margin, pair_acc = preference_margin(model, chat, held_pairs, seq_len=128)
    return {"exact_match": exact_match(replies, [a for _, a, _ in held_out]), "margin": margin,
            "pair_accuracy": pair_acc, "examples": [[q, r] for (q, _, _), r in zip(held_out[:4], replies[:4])]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="runs/tiny",
                   help="the pretrained tiny run, trained first when absent (default: runs/tiny)")
    p.add_argument("--out", default="runs/posttrain-demo",
                   help="directory of the SFT and DPO runs and summary.json (default: runs/posttrain-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated questions and of both runs (default: 0)")
    p.add_argument("--quick", action="store_true", help="a tenth of the examples and a few steps: a smoke check")
    args = p.parse_args()
    n = {"held_out": 40, "sft": 200, "pairs": 100} if args.quick else {"held_out": 400, "sft": 2000, "pairs": 1000}
    quick = 4 if args.quick else 0  # steps per stage (0: the recipe's epochs)
    from olmo_hybrid.config import apply_overrides
    from olmo_hybrid.posttrain.config import DPOConfig, SFTConfig
    from olmo_hybrid.posttrain.dpo import run_dpo
    from olmo_hybrid.posttrain.trainer import run_sft

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.source)
    if not source.exists():
        from olmo_hybrid.train import build_config, train

        print(f"{source} not found: training the tiny recipe into it first (olmo-hybrid train --out {source})")
        train(build_config(), source)
    rng = random.Random(args.seed)
    held_out = [question(rng) for _ in range(n["held_out"])]
    held_pairs = [{"prompt": q, "chosen": a, "rejected": rng.choice(wrong)} for q, a, wrong in held_out]
    sft_data = write_jsonl(out / "sft.jsonl", conversations(rng, n["sft"]))
    results = {"before": judge(source, held_out, held_pairs)}
    print("before post-training:", results["before"])

    common = ["data.seq_len=256", "data.batch_size=8", "trainer.eval_interval=20", "trainer.log_interval=10",
              "trainer.save_interval=0", f"data.seed={args.seed}", f"trainer.seed={args.seed}"]
    sft_cfg = apply_overrides(SFTConfig(), common + ["data.batch_size=4", "optim.lr=2e-3", "sft.epochs=3",
                                                     f"sft.max_steps={quick}", f"data.path={sft_data}"])
    run_sft(sft_cfg, source, out / "sft")
    results["sft"] = judge(out / "sft" / "hf", held_out, held_pairs)
    print("after SFT:", results["sft"])

    # Preference pairs on new questions: the SFT model's own mistakes as rejected answers where it makes them.
    from olmo_hybrid.posttrain.evaluate import greedy_replies

    model, chat = load(out / "sft" / "hf")
    fresh = [question(rng) for _ in range(n["pairs"])]
    replies = greedy_replies(model, chat, [q for q, _, _ in fresh])
    pairs = [{"prompt": q, "chosen": a, "rejected": r.strip() if r.strip() and r.strip() != a else rng.choice(wrong)}
             for (q, a, wrong), r in zip(fresh, replies)]
    own = sum(r.strip() != a and bool(r.strip()) for (_, a, _), r in zip(fresh, replies))
    dpo_data = write_jsonl(out / "pairs.jsonl", pairs)
    dpo_cfg = apply_overrides(DPOConfig(), common + ["data.seq_len=128", "optim.lr=5e-5", f"dpo.max_steps={quick}",
                                                     f"data.path={dpo_data}"])
    run_dpo(dpo_cfg, out / "sft" / "hf", out / "dpo")
    results["dpo"] = judge(out / "dpo" / "hf", held_out, held_pairs)
    print("after DPO:", results["dpo"])

    results.update(seconds=round(time.perf_counter() - t0), dpo_pairs_with_own_mistake=own,
                   torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or
                   platform.machine(), date=time.strftime("%Y-%m-%d"))
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'stage':<8} {'exact match':>12} {'margin':>8} {'pair acc':>9}")
    for stage in ("before", "sft", "dpo"):
        r = results[stage]
        print(f"{stage:<8} {r['exact_match']:>12.1%} {r['margin']:>8.2f} {r['pair_accuracy']:>9.1%}")
    print(f"{results['seconds']} s in all; {out / 'summary.json'}")


if __name__ == "__main__":
    main()
