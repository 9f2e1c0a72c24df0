#!/usr/bin/env bash
# The accuracy table of docs/cuttlefish.md: full-rank ResNet-18 (quarter width, CIFAR stem) and Cuttlefish on
# Fashion-MNIST, 15 epochs, 2 DDP processes, seeds 0 1 2 (configs/tiny_resnet18_dense.yaml and
# configs/tiny_resnet18_cuttlefish.yaml). Run directories: runs/cftab_<variant>_s<seed>; the record of each
# finished run (metrics.jsonl, config.yaml, plots) is kept in benchmarks/results/cuttlefish_fmnist/, a run
# recorded there is not run again, and the table is printed from the records at the end.
#   bash benchmarks/cuttlefish_table.sh [seeds...]
set -uo pipefail
cd "$(dirname "$0")/.."
seeds=("$@"); [ ${#seeds[@]} -eq 0 ] && seeds=(0 1 2)
. benchmarks/table_runs.sh
keep=benchmarks/results/cuttlefish_fmnist
for seed in "${seeds[@]}"; do
  for v in cuttlefish dense; do
    record_run "$keep" "cftab_${v}_s${seed}" "configs/tiny_resnet18_${v}.yaml" run.num_processes=2 run.seed="$seed"
  done
done
[ -d "$keep" ] && PYTHONPATH=. "$(table_python)" benchmarks/seed_table.py --runs "$keep" dense='cftab_dense_s*' \
  cuttlefish='cftab_cuttlefish_s*'
