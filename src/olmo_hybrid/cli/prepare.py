"""``olmo-hybrid prepare``: tokenize text files, JSONL or a Hugging Face dataset into token shards."""

from __future__ import annotations

import argparse
import json

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.errors import UsageError

EPILOG = """\
inputs:
  text files (.txt/.text/.md): one document per file, or several separated by lines that are exactly
  <|endoftext|>. JSONL (.jsonl/.ndjson, or .json named on its own): one object per line with a string field
  --text-field. Files may be compressed (.gz/.bz2/.xz; .zst needs `pip install zstandard`); directories are
  searched recursively for .txt/.text/.md/.jsonl/.ndjson.
  (The bundled Shakespeare corpus needs no preparing: `olmo-hybrid train` builds and caches it.)

examples:
  olmo-hybrid prepare books/*.txt --out data/books --bpe-vocab 8192
  olmo-hybrid prepare corpus.jsonl.gz --out data/corpus --tokenizer dolma2 --workers 8
  olmo-hybrid prepare --hf-dataset roneneldan/TinyStories --hf-split train --out data/tinystories
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="olmo-hybrid prepare", description=__doc__.split(":", 1)[1].strip(),
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="text/JSONL files or directories")
    p.add_argument("--out", required=True, help="output directory (replaced atomically when done)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default="dolma2",
                     help="'dolma2' (bundled, default) or a tokenizer.json / directory holding one")
    tok.add_argument("--bpe-vocab", type=int, default=None, metavar="N",
                     help="train a byte-level BPE with N ids on the training documents instead")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation choice (default 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizing processes; 1 = this process, using the tokenizer's threads "
                        "(default: all cores on machines with 8 or more, else 1)")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text (default: text)")
    p.add_argument("--hf-dataset", default=None, metavar="NAME", help="a Hugging Face dataset (needs `datasets`)")
    p.add_argument("--hf-config", default=None, help="dataset configuration name")
    p.add_argument("--hf-split", default="train", help="dataset split (default: train)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from olmo_hybrid.data.prepare import prepare

    if bool(args.inputs) == bool(args.hf_dataset):
        raise UsageError("give input files/directories or --hf-dataset (one of them)")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    out = prepare(
        args.inputs or None, args.out, tokenizer=args.tokenizer, bpe_vocab=args.bpe_vocab,
        val_fraction=args.val_fraction, seed=args.seed, workers=args.workers, text_field=args.text_field,
        hf_dataset=args.hf_dataset, hf_split=args.hf_split, hf_config=args.hf_config, progress=not args.quiet,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"wrote {out}  (tokenizer {manifest['tokenizer']['name']}, vocab {manifest['vocab_size']}, "
          f"eos {manifest['eos_token_id']})")
    for split, info in manifest["splits"].items():
        print(f"  {split:<5} {info['documents']:>8,} docs {info['tokens']:>14,} tokens {info['bytes']:>15,} bytes")
    return 0
