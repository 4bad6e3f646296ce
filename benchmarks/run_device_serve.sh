#!/bin/bash
# One device-machine call for serving; logs go to $OUT. Usage (repo root; the server's and the load
# test's packages carried as wheels in .whl/, since the device machine has no network: starlette, uvicorn,
# prometheus_client, openai, httpx and their dependencies):
#   bash benchmarks/run_device_serve.sh [phase ...]     phases, in the order given (default: tests bandwidth serve):
#   tests       the GPU tests of tests/serve (prefix cache in bf16, 3x TTFT with a shared 4k prefix, compiled decode)
#   bandwidth   decode bandwidth at b8 (4096-token prompts) and 32k-b1, 1.5B shape, eager step then compiled step
#   serve       the load test at the 1.5B shape: hybrid, hybrid without prefix cache, all-attention twin
#   serve7b     the load test at the 7B shape: 8k in, 1k out, 32 concurrent (vLLM's published setting)
# Per-phase time caps (seconds): TEST_S, BW_S, SERVE_S, SERVE7B_S; the load test's own cap per workload: CAP_S.
source benchmarks/device_env.sh
for phase in ${@:-tests bandwidth serve}; do
  echo "=== $phase $(date -u +%T)"
  case $phase in
    tests)
      timeout ${TEST_S:-240} python3 -m pytest -m gpu tests/serve -q -p no:cacheprovider --durations=8 2>&1 \
        | tee $OUT/gpu_tests.log | tail -30 ;;
    bandwidth)
      timeout ${BW_S:-400} bash -c "python3 benchmarks/bench_generate.py --cases b8,32k-b1 --systems ours-hybrid \
        --profile && python3 benchmarks/bench_generate.py --cases b8,32k-b1 --systems ours-hybrid --compile-decode" \
        2>&1 | tee $OUT/bandwidth.log | grep -v Warn ;;
    serve)
      timeout ${SERVE_S:-540} python3 benchmarks/bench_serve.py --time-cap ${CAP_S:-90} --out $OUT/serving.md 2>&1 \
        | tee $OUT/serve.log ;;
    serve7b)
      timeout ${SERVE7B_S:-540} python3 benchmarks/bench_serve.py --preset 7b --time-cap ${CAP_S:-240} \
        --out $OUT/serving.md 2>&1 | tee $OUT/serve7b.log ;;
  esac
done
echo "=== done $(date -u +%T)"
