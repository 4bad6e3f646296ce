#!/usr/bin/env bash
# Variants of the tiny recipe (and the layer-pattern comparison), each pinned to its own pair of CPU
# cores, all at once: a 16-core machine runs 7 of them in the time of one. Validation losses depend
# on the steps taken, not on the machine, so they carry over to a 2-core laptop; the per-run
# tokens/s do not (the runs share memory bandwidth), so time the chosen recipe separately.
#
#   bash benchmarks/tiny_recipe_sweep.sh OUT_DIR [MAX_MINUTES]
set -u
out=${1:?usage: tiny_recipe_sweep.sh OUT_DIR [MAX_MINUTES]}
max_minutes=${2:-8}
mkdir -p "$out"
python3 -c "from olmo_hybrid.data import prepare_bundled; prepare_bundled()"  # tokenize once, not 7 times

variants=(
  "base|"
  "lr6e-3|optim.lr=6e-3"
  "lr1.5e-3|optim.lr=1.5e-3"
  "batch16x200|data.batch_size=16 trainer.steps=200 schedule.warmup_steps=20"
  "transformer|model.layer_pattern=A"
  "pure-gdn|model.layer_pattern=G"
  "decay-matrices|optim.decay_rule=matrices"
)
i=1
for v in "${variants[@]}"; do
  name=${v%%|*}; overrides=${v#*|}
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 taskset -c $((2 * i)),$((2 * i + 1)) python3 -m olmo_hybrid.train $overrides \
    trainer.max_minutes="$max_minutes" trainer.device=cpu --out "$out/$name" > "$out/$name.log" 2>&1 &
  i=$((i + 1))
done
wait
for v in "${variants[@]}"; do
  name=${v%%|*}
  echo "== $name: ${v#*|}"
  grep -E "^model:|^step .*val|max_minutes|^finished|^validation loss|^training loss" "$out/$name.log"
done
