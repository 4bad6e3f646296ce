#!/usr/bin/env bash
# Decode and training tokens/s of an earlier tree against this one, on the same device machine in one call
# (issue #12: the redesign must be no slower). Prepare the earlier tree here, then carry it:
#   rm -rf .bench_base && mkdir .bench_base && git archive e75c12e | tar -x -C .bench_base
#   run(command="bash benchmarks/run_device_ab.sh", carry=[".bench_base"])
# Each tree runs its own benchmarks/bench_generate.py (b8 and 32k-b16, our hybrid engine) and bench_train.py (1b
# hybrid at seq 4096, compiled), base first then ours, then the generation case once more in each order so that a
# drift of the machine shows. Logs in $OUT/ab_{base,ours}_{generate,train}.log.
source benchmarks/device_env.sh
here=$PWD
run_tree() {  # name dir phase
  cd "$2" || exit 1
  case $3 in
    generate) timeout ${GEN_S:-150} env PYTHONPATH=$PWD/src python3 benchmarks/bench_generate.py --cases b8,32k-b16 \
                --systems ours-hybrid 2>&1 | grep -v Warn | tee -a "$OUT/ab_$1_generate.log" | grep -E "^\| " ;;
    train) timeout ${TRAIN_S:-150} env PYTHONPATH=$PWD/src python3 benchmarks/bench_train.py single \
             --only "hybrid 4096" --steps 20 --warmup 4 --timeout 140 --json "$OUT/ab_$1_train.json" 2>&1 \
             | tee "$OUT/ab_$1_train.log" | tail -4 ;;
  esac
  cd "$here"
}
for phase in generate train; do
  echo "=== base $phase $(date -u +%T)"; run_tree base .bench_base $phase
  echo "=== ours $phase $(date -u +%T)"; run_tree ours "$here" $phase
done
echo "=== ours generate again $(date -u +%T)"; run_tree ours "$here" generate
echo "=== base generate again $(date -u +%T)"; run_tree base .bench_base generate
echo "=== done $(date -u +%T)"
