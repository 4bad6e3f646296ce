#!/usr/bin/env bash
# Device wrapper for the long-context work (docs/long_context.md, docs/benchmarks.md). Everything lands in $OUT.
#   bash benchmarks/run_device_longctx.sh tests        # pytest -m gpu for the paths long context touches (~3 min)
#   bash benchmarks/run_device_longctx.sh bench hybrid # 1b at 16k/32k/64k, full activation checkpointing (~6 min);
#   bash benchmarks/run_device_longctx.sh bench transformer   # then the same-size transformer
#   bash benchmarks/run_device_longctx.sh experiment   # resumable: repeat (same warm machine) until it says done;
#                                                      # carry .longctx (bash benchmarks/longctx_data.sh first)
mode=${1:-tests}
source benchmarks/device_env.sh
case "$mode" in
  tests)
    timeout 500 python -m pytest -q -m gpu tests/longctx/test_gpu_longctx.py tests/model/test_gpu.py \
      tests/serve/test_engine_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/longctx_gpu_tests.log" ;;
  bench)
    which=${2:-hybrid}
    timeout 560 python benchmarks/bench_train.py long --only "$which" --steps 8 --warmup 3 --timeout 250 \
      --set trainer.activation_checkpointing=full --md "$OUT/long_$which.md" --json "$OUT/long_$which.json" 2>&1 \
      | tee "$OUT/long_$which.log" ;;
  experiment)
    timeout 580 python -m olmo_hybrid longctx-experiment benchmarks/longctx_experiment.json \
      --max-minutes "${MINUTES:-8.5}" 2>&1 | tee "$OUT/longctx_experiment.log"
    cp benchmarks/results/longctx_experiment.jsonl docs/long_context.md "$OUT"/ 2>/dev/null
    cp docs/long_context_ruler.png "$OUT"/ 2>/dev/null
    true ;;
  *) echo "unknown mode $mode (tests | bench hybrid|transformer | experiment)"; exit 2 ;;
esac
