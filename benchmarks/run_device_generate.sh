#!/bin/bash
# One device-machine call for the generation engine; logs go to $OUT. Usage (repo root, .whl carried
# for fla, which transformers' OlmoHybrid uses):
#   bash benchmarks/run_device_generate.sh [phase ...]     phases, in the order given (default: tests b8 long):
#   tests   the GPU tests of tests/serve (CUDA graphs vs eager, decode kernel at 32k, bf16 greedy vs full forwards)
#   b8      decode-attention kernel alone, the greedy check (8 prompts x 32 new tokens), then the b8 case for our
#           engine (hybrid and all-attention twin) and transformers' Olmo3, with decode profiles
#   long    32k-b1, 32k-b16 and 64k-fit for our engine (hybrid and all-attention twin), with decode profiles
#   b8all   decode-attention kernel alone, the greedy check, then the b8 case for all four systems in one process
#           (transformers' OlmoHybrid with fla last: fla autotunes on its first call), with profiles of our engine
#   long32  32k-b1 and 32k-b16 only (no profiles)
# Per-phase time caps (seconds): TEST_S, B8_S, LONG_S, B8ALL_S.
source benchmarks/device_env.sh
BENCH="python3 benchmarks/bench_generate.py"
for phase in ${@:-tests b8 long}; do
  echo "=== $phase $(date -u +%T)"
  case $phase in
    tests)
      timeout ${TEST_S:-150} python3 -m pytest -m gpu tests/serve -q -p no:cacheprovider --durations=6 2>&1 \
        | tee $OUT/gpu_tests.log | tail -30 ;;
    b8)
      timeout ${B8_S:-150} $BENCH --kernel-bench --check --profile --cases b8 --systems ours-hybrid,ours-attn,hf-olmo3 \
        2>&1 | tee $OUT/b8.log | grep -v Warn ;;
    long)
      timeout ${LONG_S:-240} $BENCH --profile --cases 32k-b1,32k-b16,64k-fit 2>&1 | tee $OUT/long.log | grep -v Warn ;;
    b8all)
      timeout ${B8ALL_S:-300} $BENCH --kernel-bench --check --profile --cases b8 2>&1 | tee $OUT/b8all.log \
        | grep -v Warn ;;
    long32)
      timeout ${LONG_S:-240} $BENCH --cases 32k-b1,32k-b16 2>&1 | tee $OUT/long32.log | grep -v Warn ;;
  esac
done
echo "=== done $(date -u +%T)"
