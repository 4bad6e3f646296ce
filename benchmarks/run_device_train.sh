#!/usr/bin/env bash
# Device wrapper for benchmarks/bench_train.py (docs/benchmarks.md, "Training throughput").
#   bash benchmarks/run_device_train.sh single   # nvidia-h100-x1: GPU test of the training fast paths, then the
#                                                # 1b hybrid vs same-size transformer table at seq 4096 and 8192
#   bash benchmarks/run_device_train.sh dist     # nvidia-h200-x2: 190m on 2 GPUs (FSDP2) + save, resume on 1 GPU
#   bash benchmarks/run_device_train.sh compare  # nvidia-h100-x1, carry .whl (fla): GPU test, 1b hybrid at 4096
#                                                # compiled + profile, then eager with our GDN kernel vs fla's
#   bash benchmarks/run_device_train.sh mamba2   # nvidia-h100-x1: GPU tests of Mamba2 training, then the 1b GDN
#                                                # hybrid beside the 3:1 hybrid Mamba2 (MMMA) at seq 4096 and 8192
# BENCH_ARGS adds bench_train.py options (e.g. "--only hybrid"). Everything lands in $OUT (the device tool's output folder; /tmp/out elsewhere).
mode=${1:-single}
source benchmarks/device_env.sh
if [ "$mode" = single ]; then
  timeout 150 python -m pytest -q -m gpu tests/train/test_gpu_train.py -s -p no:cacheprovider 2>&1 \
    | tee "$OUT/train_gpu_tests.log"
  timeout 400 python benchmarks/bench_train.py single --steps 30 --warmup 4 --profile 3 --timeout 200 \
    --md "$OUT/train_1gpu.md" --json "$OUT/train_1gpu.json" $BENCH_ARGS 2>&1 | tee "$OUT/train_1gpu.log"
elif [ "$mode" = mamba2 ]; then
  timeout 200 python -m pytest -q -m gpu tests/train/test_gpu_train.py tests/train/test_mamba2_train.py -s \
    -p no:cacheprovider 2>&1 | tee "$OUT/train_mamba2_gpu_tests.log"
  timeout 380 python benchmarks/bench_train.py single --only hybrid --steps 30 --warmup 4 --profile 3 --timeout 170 \
    --md "$OUT/train_mamba2.md" --json "$OUT/train_mamba2.json" $BENCH_ARGS 2>&1 | tee "$OUT/train_mamba2.log"
elif [ "$mode" = compare ]; then
  timeout 150 python -m pytest -q -m gpu tests/train/test_gpu_train.py -s -p no:cacheprovider 2>&1 \
    | grep -v DEBUG | tee "$OUT/train_gpu_tests.log"
  timeout 150 python benchmarks/bench_train.py single --only "hybrid 4096" --steps 20 --warmup 4 --profile 3 \
    --timeout 140 --json "$OUT/compiled.json" 2>&1 | tee "$OUT/compiled.log"
  for b in triton fla; do
    timeout 100 python benchmarks/bench_train.py single --only "hybrid 4096" --steps 20 --warmup 3 --no-compile \
      --gdn-backend $b --timeout 90 --json "$OUT/eager_$b.json" 2>&1 | tee "$OUT/eager_$b.log"
  done
else
  timeout 480 python benchmarks/bench_train.py dist --gpus 2 --steps 40 --warmup 5 --seq 4096 --batch 4 \
    --set trainer.export_hf=true --timeout 400 --md "$OUT/train_2gpu.md" --json "$OUT/train_2gpu.json" 2>&1 \
    | tee "$OUT/train_2gpu.log"
fi
