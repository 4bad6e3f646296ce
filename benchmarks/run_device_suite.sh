#!/usr/bin/env bash
# The whole GPU suite on a device machine (nvidia-h100-x1; carry .whl for fla, mamba_ssm and the server's
# packages), each test's outcome in $OUT/gpu_suite.log as it finishes, so a run stopped by its time cap still says
# how far it got. It needed more than 400 s on an H100 on 2026-12-07: give it a call of its own.
#   bash benchmarks/run_device_suite.sh [pytest arguments]    # e.g. tests/serve tests/train for a part
# SUITE_S caps the time (seconds, default 560).
source benchmarks/device_env.sh
timeout ${SUITE_S:-560} python3 -m pytest -m gpu -v --tb=short -rf --durations=15 -p no:cacheprovider \
  ${@:-tests} 2>&1 | tee "$OUT/gpu_suite.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|error" | cut -c1-200
