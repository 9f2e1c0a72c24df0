#!/usr/bin/env bash
# The accuracy table of docs/polarization.md: dense, polarization layer pruning and channel pruning on
# Fashion-MNIST ResNet-20, the demo's recipe (3 epochs, 2 DDP processes), seeds 0 1 2. The dense rows are the
# dense runs of the AutoSparse table (benchmarks/results/autosparse_fmnist/tab_dense_s*, the same recipe and
# harness; `bash benchmarks/autosparse_table.sh` makes them). Run directories: runs/poltab_<variant>_s<seed>;
# the record of each finished run (metrics.jsonl, config.yaml) is kept in benchmarks/results/polarization_fmnist/,
# a run recorded there is not run again, and the table is printed from the records at the end.
#   bash benchmarks/polarization_table.sh [seeds...]
set -uo pipefail
cd "$(dirname "$0")/.."
seeds=("$@"); [ ${#seeds[@]} -eq 0 ] && seeds=(0 1 2)
. benchmarks/table_runs.sh
keep=benchmarks/results/polarization_fmnist
declare -A config=([layer]=configs/tiny_resnet20_polarization.yaml [channel]=configs/tiny_resnet20_polarization_channel.yaml)
for seed in "${seeds[@]}"; do
  for v in layer channel; do
    record_run "$keep" "poltab_${v}_s${seed}" "${config[$v]}" run.seed="$seed"
  done
done
PYTHONPATH=. "$(table_python)" benchmarks/seed_table.py --runs "$keep" dense='../autosparse_fmnist/tab_dense_s*' \
  layer='poltab_layer_s*' channel='poltab_channel_s*'
