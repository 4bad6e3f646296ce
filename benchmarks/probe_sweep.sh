#!/usr/bin/env bash
# Reproduces docs/probes/: every (task, model) probe run from scratch, one process each, then merged.
# Sized for one GPU (about 5 minutes on an H100 with the exact torch ops); on CPU pass DEVICE=cpu and
# expect hours. Usage: benchmarks/probe_sweep.sh [OUT_DIR]   (default docs/probes)
set -euo pipefail
OUT=${1:-docs/probes}
DEVICE=${DEVICE:-cuda}
TMP=$(mktemp -d)
COMMON="--n-layers 4 --batch-size 128 --device $DEVICE --no-plot --threads 1"
run() {  # task model extra-args...
  local task=$1 model=$2; shift 2
  python -m olmo_hybrid.eval.probes --task "$task" --models "$model" $COMMON --out "$TMP/$task-$model" "$@" \
    > "$TMP/$task-$model.log" 2>&1 &
}
for m in gdn gdn-noneg hybrid hybrid-noneg transformer; do run parity $m --train-len 64 --steps 2000; done
for m in gdn gdn-noneg hybrid transformer; do run modular $m --train-len 64 --steps 3000; done
for m in gdn hybrid transformer; do run mqar $m --train-len 64 --steps 3000 --lr 1e-3; done
for m in gdn transformer; do run s5 $m --train-len 16 --steps 3000; done
wait
python -m olmo_hybrid.eval.probes --merge "$TMP"/*/*.json --out "$OUT" ${NO_PLOT:+--no-plot}
