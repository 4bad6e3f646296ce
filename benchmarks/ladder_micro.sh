#!/usr/bin/env bash
# The micro-ladder (benchmarks/ladder_micro.json) on the device machine, over one or several sessions
# (docs/scaling.md, "Running the micro-ladder").
#
# The Gutenberg training text (174 MB as .xz) is larger than one call may carry (64 MiB with the repo), so it
# travels in three parts, one per call, to a warm machine (calls less than 30 s apart), where it is kept in
# /tmp/olmo_ladder outside the repo; everything else happens there.
#
#   here, once:  bash benchmarks/ladder_micro.sh split        # .ladder/part-{0,1,2} (gitignored, ~58 MB each)
#   device, each session:
#     carry .ladder/part-0:  bash benchmarks/ladder_micro.sh receive 0
#     carry .ladder/part-1:  bash benchmarks/ladder_micro.sh receive 1
#     carry .ladder/part-2:  bash benchmarks/ladder_micro.sh receive 2 && bash benchmarks/ladder_micro.sh prepare
#     no carry, repeated:    bash benchmarks/ladder_micro.sh run 8 [ladder options, e.g. --sizes micro-256]
#   then here: copy $OUT/results.jsonl to benchmarks/results/ladder_micro/results.jsonl and commit it; the next
#   session's `run` starts from it (a point in it is never trained again; runs cut off by the session's end
#   restart their stable phase, the points they finished stay).
#   device, optional first call: bash benchmarks/ladder_micro.sh smoke   # 2-4 min: step rates on the bundled
#                                                                        # corpus, at --parallel 1 and 4
# LADDER_PARALLEL (default 4) runs share the GPU; $OUT is the device tool's output folder (/tmp/out elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
WORK=/tmp/olmo_ladder
# the corpus beside the checkout (main checkout: ../shared; a worktree: ../../shared), or $GUTENBERG
for d in ../shared/data/gutenberg_top_authors ../../shared/data/gutenberg_top_authors; do
  [ -d "$d" ] && GUTENBERG=${GUTENBERG:-$d}
done
SOURCE=${GUTENBERG:-../shared/data/gutenberg_top_authors}/train.txt.xz
SHA256=f94277b55b6a021d93dd9cade9359ba6991513ce87c4fdf7c948b5105002342c  # SOURCE.md
DATA=$WORK/gutenberg-bpe4096
RESULTS=benchmarks/results/ladder_micro/results.jsonl
mkdir -p "$OUT" "$WORK"

case "${1:-}" in
split)
  mkdir -p .ladder
  split -n 3 -d -a 1 "$SOURCE" .ladder/part-
  ls -l .ladder
  ;;
receive)
  mv ".ladder/part-$2" "$WORK/part-$2"
  ls -l "$WORK"
  ;;
prepare)
  cat "$WORK"/part-0 "$WORK"/part-1 "$WORK"/part-2 > "$WORK/train.txt.xz"
  echo "$SHA256  $WORK/train.txt.xz" | sha256sum -c -
  # The committed tokenizer and the same split (1% of the books, seed 0) give the same tokens every session.
  python -m olmo_hybrid prepare "$WORK/train.txt.xz" --out "$DATA" --tokenizer benchmarks/ladder_micro_tokenizer.json \
    --val-fraction 0.01 --seed 0 --workers 16 2>&1 | tee "$OUT/prepare.log"
  ;;
run)
  minutes=${2:-8}
  shift 2 || shift $#
  if [ ! -s "$WORK/out/results.jsonl" ] && [ -s "$RESULTS" ]; then
    mkdir -p "$WORK/out" && cp "$RESULTS" "$WORK/out/results.jsonl"
  fi
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.log"
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.log"
  rc=0
  python -m olmo_hybrid ladder benchmarks/ladder_micro.json "data=$DATA" --out "$WORK/out" \
    --parallel "${LADDER_PARALLEL:-4}" --max-minutes "$minutes" "$@" 2>&1 | tee "$OUT/ladder.log" || rc=$?
  cp "$WORK/out/results.jsonl" "$OUT/results.jsonl" 2>/dev/null || true
  (cd "$WORK/out" && tar czf "$OUT/runs.tar.gz" --exclude=checkpoints runs) || true
  exit "$rc"
  ;;
smoke)
  data=$(python -c "from olmo_hybrid.data import prepare_bundled; print(prepare_bundled())")
  for p in 1 4; do
    rm -rf "$WORK/smoke$p"
    python -m olmo_hybrid ladder benchmarks/ladder_micro.json "data=$data" architectures=hybrid,transformer,pure-gdn \
      budgets=1 recipe.tokens_per_param=2 max_epochs=100 --out "$WORK/smoke$p" --parallel $p --report-interval 20 \
      2>&1 | tee "$OUT/smoke_parallel$p.log"
    python - "$WORK/smoke$p" <<'EOF' | tee "$OUT/smoke_parallel$p.txt"
import json, pathlib, statistics, sys
root = pathlib.Path(sys.argv[1])
for run in sorted((root / "runs").iterdir()):
    rows = [json.loads(l) for l in (run / "stable" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rate = statistics.median(r["tokens_per_s"] for r in rows[10:]) if len(rows) > 10 else float("nan")
    print(f"{run.name:<32} {len(rows):>5} stable steps  median {rate:>12,.0f} tokens/s")
EOF
  done
  ;;
*)
  sed -n 2,22p "$0"
  exit 2
  ;;
esac
