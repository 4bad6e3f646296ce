#!/usr/bin/env bash
# Wheels the device machine needs but cannot fetch (it has no network), into .whl/ (gitignored; carry it):
# fla (the GDN kernels' peer), mamba_ssm (the SSD kernels' peer, built without its CUDA extension), and the
# server's and load test's packages with their dependencies. Run once per checkout, here, from the repository root:
#   bash benchmarks/fetch_device_wheels.sh           then  run(command=..., carry=[".whl"])
# The device image runs CPython 3.12 on x86-64 with torch, triton and transformers installed: fla and mamba_ssm are
# fetched without dependencies so that none of those is downloaded again.
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
target=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any --only-binary=:all: -q -d "$dest")
pip download "${target[@]}" --no-deps flash-linear-attention==0.6.0 fla-core==0.6.0 einops==0.8.2
pip download "${target[@]}" starlette uvicorn prometheus_client openai httpx
# The GPU suite runs in several pytest workers (run_device_suite.sh); the image has pytest itself.
pip download "${target[@]}" --no-deps pytest-xdist execnet
# mamba_ssm's Triton SSD needs no CUDA extension: build the package as pure Python.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel -q --no-deps --no-build-isolation -w "$dest" \
  mamba-ssm==2.3.2.post1 || echo "mamba_ssm was not built: bench_ssd.py then times ours and the GDN op only"
ls "$dest"
du -sh "$dest"
