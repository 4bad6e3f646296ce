#!/usr/bin/env bash
# The long-context experiment's data, small enough to travel to the GPU machine (the working tree it receives is at
# most 64 MiB): the first MB MiB (default 165, about 40M tokens; 47.6 MiB compressed) of the shared Gutenberg
# training split, recompressed, and the validation split as RULER's haystack (books the models never train on).
# xz -6 over 165 MiB took 10 minutes on the busy 2-core development machine.
#   bash benchmarks/longctx_data.sh [GUTENBERG_DIR] [MB]      # writes .longctx/ (git-ignored; carry it)
set -euo pipefail
src=${1:-/work/shared/data/gutenberg_top_authors}
mb=${2:-165}
mkdir -p .longctx
# head stops reading early: the decompressor's broken pipe is expected
{ xz -dc "$src/train.txt.xz" || true; } | head -c "${mb}M" | xz -T2 -6 > .longctx/gutenberg_train_subset.txt.xz.tmp
mv .longctx/gutenberg_train_subset.txt.xz.tmp .longctx/gutenberg_train_subset.txt.xz
cp "$src/validation.txt.xz" .longctx/validation.txt.xz
ls -l .longctx
