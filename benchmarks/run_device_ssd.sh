#!/bin/bash
# One device-machine call for the SSD (Mamba2) kernels; logs and JSON go to $OUT. Usage (repo root; .whl/ carried,
# holding the pure-Python mamba_ssm and einops wheels, see benchmarks/bench_ssd.py):
#   bash benchmarks/run_device_ssd.sh [phase ...]     phases, in the order given (default: tests bench):
#   tests    every test of tests/ops/ssd/test_ssd_triton.py on the GPU (the interpreter-sized ones included) and the
#            Mamba2 mixer tests
#   small    the small/odd-shape GPU tests under compute-sanitizer memcheck (caching allocator off)
#   bench    bench_ssd.py: ours, our GDN op and mamba_ssm at the 1b width, per-kernel profile, decode step
# Per-phase time caps (seconds): TEST_S, SMALL_S, BENCH_S.
source benchmarks/device_env.sh
for phase in ${@:-tests bench}; do
  echo "=== $phase $(date -u +%T)"
  case $phase in
    tests)
      timeout ${TEST_S:-240} python3 -m pytest -m "gpu or not gpu" tests/ops/ssd/test_ssd_triton.py \
        tests/model/test_mamba2.py -q -p no:cacheprovider --durations=8 2>&1 | tee $OUT/ssd_gpu_tests.log | tail -25 ;;
    small)
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SMALL_S:-150} compute-sanitizer --tool memcheck --print-limit 8 \
        python3 -m pytest -m gpu tests/ops/ssd/test_ssd_triton.py -k "small_and_odd" -q -p no:cacheprovider -x 2>&1 \
        | tee $OUT/ssd_small_sanitizer.log | grep -v "^    " | tail -30 ;;
    bench)
      timeout ${BENCH_S:-300} python3 benchmarks/bench_ssd.py --impls ssd,gdn,mamba_ssm --profile --decode \
        --json $OUT/bench_ssd.json 2>&1 | tee $OUT/bench_ssd.log | grep -v Warn ;;
  esac
done
