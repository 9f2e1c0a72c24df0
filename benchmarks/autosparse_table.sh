#!/usr/bin/env bash
# The accuracy table of docs/autosparse.md: dense, AutoSparse, STR, RigL and GMP on Fashion-MNIST ResNet-20,
# the demo's recipe (3 epochs, 2 DDP processes), seeds 0 1 2; RigL and GMP at 85 % sparsity, the sparsity the
# learned thresholds reach. Run directories: runs/tab_<method>_s<seed>. The record of each finished run
# (metrics.jsonl, config.yaml) is kept in benchmarks/results/autosparse_fmnist/, and a run recorded there is
# not run again; the table is printed from that folder at the end.
#   bash benchmarks/autosparse_table.sh [seeds...]
set -uo pipefail
cd "$(dirname "$0")/.."
seeds=("$@"); [ ${#seeds[@]} -eq 0 ] && seeds=(0 1 2)
. benchmarks/table_runs.sh
keep=benchmarks/results/autosparse_fmnist
for seed in "${seeds[@]}"; do
  for m in autosparse dense str rigl gmp; do
    extra=()
    case $m in rigl|gmp) extra=(method.sparsity=0.85);; esac
    record_run "$keep" "tab_${m}_s${seed}" "configs/tiny_resnet20_${m}.yaml" run.seed="$seed" "${extra[@]}"
  done
done
PYTHONPATH=. "$(table_python)" benchmarks/seed_table.py --runs "$keep" dense='tab_dense_s*' autosparse='tab_autosparse_s*' \
  str='tab_str_s*' rigl_85='tab_rigl_s*' gmp_85='tab_gmp_s*'
