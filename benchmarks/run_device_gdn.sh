#!/bin/bash
# One device-machine call for the GDN kernels; logs and JSON go to $OUT. Usage (repo root, .whl carried for fla):
#   bash benchmarks/run_device_gdn.sh [phase ...]     phases, in the order given (default: tests bench fla):
#   small    the small/odd-shape GPU tests with CUDA_LAUNCH_BLOCKING=1, then under compute-sanitizer memcheck
#            (PyTorch's caching allocator off, so an out-of-bounds access cannot land inside a pooled block)
#   tests    every GPU test of tests/ops and the trainer's bf16 GPU training step (4 workers)
#   bench    ours + SDPA at both shapes with the per-kernel profile, and the decode step
#   tf32     ours with tf32 dot operands (KernelSettings(dot="tf32")): accuracy and times
#   fla      ours + fla + SDPA side by side, both shapes, with profiles; fla's autotune configs (and our kernels)
#            are compiled first by 8 parallel workers (bench_gdn.py --fla-warm)
#   warps8   fwd+bwd times with the parallel backward kernels at 8 warps (KernelSettings(backward_warps=8), their
#            setting before 2026-11-22)
# Per-phase time caps (seconds): SMALL_S, TEST_S, BENCH_S, FLA_S (WARM_S of it for the fla warm-up workers).
source benchmarks/device_env.sh
SMALL_K="small_and_odd or tiny_model"
for phase in ${@:-tests bench fla}; do
  echo "=== $phase $(date -u +%T)"
  case $phase in
    small)
      CUDA_LAUNCH_BLOCKING=1 timeout ${SMALL_S:-150} python3 -m pytest -m gpu tests/ops/gated_delta_rule \
        tests/ops/short_conv -k "$SMALL_K" -q -p no:cacheprovider -x 2>&1 | tee $OUT/small.log | tail -30
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SMALL_S:-150} compute-sanitizer --tool memcheck --print-limit 8 \
        python3 -m pytest -m gpu tests/ops/gated_delta_rule tests/ops/short_conv -k "$SMALL_K" -q \
        -p no:cacheprovider -x 2>&1 | tee $OUT/small_sanitizer.log | grep -v "^    " | tail -40 ;;
    tests)
      timeout ${TEST_S:-200} python3 -m pytest -m gpu tests/ops tests/train/test_trainer.py -q -n 4 \
        -p no:cacheprovider --durations=8 2>&1 \
        | tee $OUT/gpu_tests.log | tail -25 ;;
    bench)
      timeout ${BENCH_S:-200} python3 benchmarks/bench_gdn.py --impls ours,sdpa --profile --decode \
        --json $OUT/bench_ours.json 2>&1 | tee $OUT/bench_ours.log | grep -v Warn ;;
    tf32)
      timeout ${BENCH_S:-200} python3 benchmarks/bench_gdn.py --impls ours --profile \
        --kernel-settings '{"dot": "tf32"}' --json $OUT/bench_tf32.json 2>&1 | tee $OUT/bench_tf32.log | grep -v Warn ;;
    fla)
      timeout ${FLA_S:-400} python3 benchmarks/bench_gdn.py --impls ours,fla,sdpa --profile --fla-warm 8 \
        --fla-warm-timeout ${WARM_S:-150} \
        --json $OUT/bench_fla.json 2>&1 | tee $OUT/bench_fla.log | grep -v Warn ;;
    warps8)
      timeout ${BENCH_S:-200} python3 benchmarks/bench_gdn.py --impls ours --modes fwd+bwd \
        --kernel-settings '{"backward_warps": 8}' --json $OUT/bench_warps8.json 2>&1 \
        | tee $OUT/bench_warps8.log | grep -v Warn ;;
  esac
done
