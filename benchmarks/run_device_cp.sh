#!/usr/bin/env bash
# Device wrapper for benchmarks/bench_cp.py (issue 21; docs/training.md, "Context parallelism"), on nvidia-h100-x2:
#   bash benchmarks/run_device_cp.sh
# 1. the GPU tests of state passing (compiled Triton kernels) and the CPU context-parallel tests including the
#    slow ones (4 ranks, compiled blocks), 2. the 1b hybrid at 32K and 64K: 1 GPU without CP, 2 GPUs with
#    Ulysses and with state passing. BENCH_ARGS adds bench_cp.py options (e.g. "--only 65536").
# Everything lands in $OUT (the device tool's output folder; /tmp/out elsewhere).
set -o pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/cp_env.log"
timeout 300 python -m pytest -q -m "gpu or slow or not slow" tests/train/test_state_passing.py \
  tests/train/test_context_parallel.py -p no:cacheprovider 2>&1 | tee "$OUT/cp_tests.log"
timeout 3000 python benchmarks/bench_cp.py --md "$OUT/cp.md" --json "$OUT/cp.json" $BENCH_ARGS 2>&1 \
  | tee "$OUT/cp_bench.log"
