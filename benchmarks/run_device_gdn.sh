#!/bin/bash
# One device-machine call for the GDN kernels; logs and JSON go to $OUT. Usage (repo root, .whl carried for fla):
#   bash benchmarks/run_device_gdn.sh [phase ...]     phases, in the order given (default: tests bench fla):
#   small    the small/odd-shape GPU tests with CUDA_LAUNCH_BLOCKING=1, then under compute-sanitizer memcheck
#            (PyTorch's caching allocator off, so an out-of-bounds access cannot land inside a pooled block)
#   tests    every GPU test of tests/ops and the trainer's bf16 GPU training step (4 workers)
#   bench    ours + SDPA at both shapes with the per-kernel profile, and the decode step
#   bf16     ours with bf16 dot operands (OLMO_HYBRID_GDN_DOT=bf16): accuracy and times
#   fla      ours + fla + SDPA side by side, both shapes, with profiles; fla's autotune configs (and our kernels)
#            are compiled first by 8 parallel workers (bench_gdn.py --fla-warm)
#   warps8   the backward kernel at 8 warps (OLMO_HYBRID_GDN_BWD_WARPS=8, its setting before 2026-11-22): the
#            small-shape tests and fwd+bwd times
# Per-phase time caps (seconds): SMALL_S, TEST_S, BENCH_S, FLA_S (WARM_S of it for the fla warm-up workers).
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
SMALL_K="small_and_odd or tiny_model"
for phase in ${@:-tests bench fla}; do
  echo "=== $phase $(date -u +%T)"
  case $phase in
    small)
      CUDA_LAUNCH_BLOCKING=1 timeout ${SMALL_S:-150} python3 -m pytest -m gpu tests/ops/test_triton_gdn.py \
        tests/ops/test_triton_conv.py -k "$SMALL_K" -q -p no:cacheprovider -x 2>&1 | tee $OUT/small.log | tail -30
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SMALL_S:-150} compute-sanitizer --tool memcheck --print-limit 8 \
        python3 -m pytest -m gpu tests/ops/test_triton_gdn.py tests/ops/test_triton_conv.py -k "$SMALL_K" -q \
        -p no:cacheprovider -x 2>&1 | tee $OUT/small_sanitizer.log | grep -v "^    " | tail -40 ;;
    tests)
      timeout ${TEST_S:-200} python3 -m pytest -m gpu tests/ops tests/train/test_trainer.py -q -n 4 \
        -p no:cacheprovider --durations=8 2>&1 \
        | tee $OUT/gpu_tests.log | tail -25 ;;
    bench)
      timeout ${BENCH_S:-200} python3 benchmarks/bench_gdn.py --impls ours,sdpa --profile --decode \
        --json $OUT/bench_ours.json 2>&1 | tee $OUT/bench_ours.log | grep -v Warn ;;
    bf16)
      OLMO_HYBRID_GDN_DOT=bf16 timeout ${BENCH_S:-200} python3 benchmarks/bench_gdn.py --impls ours --profile \
        --json $OUT/bench_bf16.json 2>&1 | tee $OUT/bench_bf16.log | grep -v Warn ;;
    fla)
      timeout ${FLA_S:-400} python3 benchmarks/bench_gdn.py --impls ours,fla,sdpa --profile --fla-warm 8 \
        --fla-warm-timeout ${WARM_S:-150} \
        --json $OUT/bench_fla.json 2>&1 | tee $OUT/bench_fla.log | grep -v Warn ;;
    warps8)
      export OLMO_HYBRID_GDN_BWD_WARPS=8
      timeout ${SMALL_S:-150} python3 -m pytest -m gpu tests/ops/test_triton_gdn.py -k "$SMALL_K" -q -n 4 \
        -p no:cacheprovider 2>&1 | tee $OUT/warps8_tests.log | tail -12
      timeout ${BENCH_S:-200} python3 benchmarks/bench_gdn.py --impls ours --modes fwd+bwd \
        --json $OUT/bench_warps8.json 2>&1 | tee $OUT/bench_warps8.log | grep -v Warn
      unset OLMO_HYBRID_GDN_BWD_WARPS ;;
  esac
done
