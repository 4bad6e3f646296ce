#!/usr/bin/env bash
# Device wrapper for benchmarks/bench_cp.py (docs/training.md, "Context parallelism"), on nvidia-h100-x2,
# one call per step (each under the device tool's 10 minutes):
#   bash benchmarks/run_device_cp.sh tests   # GPU tests of state passing (compiled Triton kernels) and every CPU
#                                            # context-parallel test, the slow ones included (4 ranks, compiled)
#   bash benchmarks/run_device_cp.sh 32768   # 1b hybrid at 32K: 1 GPU without CP, 2 GPUs Ulysses, 2 GPUs state passing
#   bash benchmarks/run_device_cp.sh 65536   # the same at 64K (1 GPU without CP may run out of memory: reported)
# BENCH_ARGS adds bench_cp.py options (e.g. "--steps 8 --no-compile"). Everything lands in $OUT (the device tool's
# output folder; /tmp/out elsewhere).
what=${1:-tests}
source benchmarks/device_env.sh
if [ "$what" = tests ]; then
  timeout 540 python -m pytest -q -m "gpu or not gpu" tests/train/test_state_passing.py \
    tests/train/test_context_parallel.py -p no:cacheprovider 2>&1 | tee "$OUT/cp_tests.log"
else
  timeout 560 python benchmarks/bench_cp.py --lengths "$what" --timeout 180 --md "$OUT/cp_$what.md" \
    --json "$OUT/cp_$what.json" $BENCH_ARGS 2>&1 | tee "$OUT/cp_$what.log"
fi
