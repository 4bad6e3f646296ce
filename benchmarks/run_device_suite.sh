#!/usr/bin/env bash
# The whole GPU suite on a device machine (nvidia-h100-x1; carry .whl for fla, mamba_ssm, pytest-xdist and the
# server's packages), each test's outcome in $OUT/gpu_suite.log as it finishes, so a run stopped by its time cap
# still says how far it got. In one process it needed more than 400 s on an H100 on 2026-12-07, most of it Triton
# compiling on the host: SUITE_WORKERS pytest workers (default 4; 1 for one process) share the GPU, then the tests
# marked `timing` (they assert wall-clock times) run alone.
#   bash benchmarks/run_device_suite.sh [pytest arguments]    # e.g. tests/serve tests/train for a part
# SUITE_S caps the time of both parts together (seconds, default 560).
source benchmarks/device_env.sh
workers=()
if [ "${SUITE_WORKERS:-4}" -gt 1 ] && python3 -c "import xdist" 2>/dev/null; then
  workers=(-n "${SUITE_WORKERS:-4}")
fi
end=$((SECONDS + ${SUITE_S:-560}))
args=(-v --tb=short -rf --durations=25 -p no:cacheprovider)
timeout $((end - SECONDS)) python3 -m pytest -m "gpu and not timing" "${args[@]}" "${workers[@]}" ${@:-tests} 2>&1 \
  | tee "$OUT/gpu_suite.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|error" | cut -c1-200
echo "=== alone: the tests marked timing" | tee -a "$OUT/gpu_suite.log"
timeout $((end - SECONDS)) python3 -m pytest -m "gpu and timing" "${args[@]}" ${@:-tests} 2>&1 \
  | tee -a "$OUT/gpu_suite.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|error" | cut -c1-200
