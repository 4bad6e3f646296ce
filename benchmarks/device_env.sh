# Sourced by the benchmarks/run_device_*.sh scripts at the repository root of a device machine: our sources and
# the wheels carried in .whl/ (fla, mamba_ssm, the server's packages; bash benchmarks/fetch_device_wheels.sh) on
# the path, $OUT made (the device tool's output folder; /tmp/out elsewhere), and the machine and versions logged
# to $OUT/env.log. The wheels go to a folder of their own through python3's own pip: the image's `pip` may belong
# to another interpreter.
set -o pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.log"
