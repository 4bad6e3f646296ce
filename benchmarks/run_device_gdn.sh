#!/bin/bash
# One device-machine call: GPU tests, our kernels + SDPA (with per-kernel profile and decode), then fla side by side
# per shape. Logs and JSON go to $OUT. Usage (repo root, .whl carried): bash benchmarks/run_device_gdn.sh
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PYTHONPATH:/tmp/site
timeout ${TEST_S:-150} python3 -m pytest -m gpu tests/ops/test_triton_gdn.py tests/ops/test_triton_conv.py -q \
  -n 4 -p no:cacheprovider --durations=8 2>&1 | tee $OUT/gpu_tests.log | tail -15
timeout ${OURS_S:-150} python3 benchmarks/bench_gdn.py --impls ours,sdpa --profile --decode \
  --json $OUT/bench_ours.json 2>&1 | tee $OUT/bench_ours.log | grep -v Warn
for shape in d128 olmo7b; do
  timeout ${FLA_S:-150} python3 benchmarks/bench_gdn.py --impls ours,fla --shapes $shape --modes fwd,fwd+bwd \
    --json $OUT/bench_fla_$shape.json 2>&1 | tee $OUT/bench_fla_$shape.log | grep -v Warn
done
