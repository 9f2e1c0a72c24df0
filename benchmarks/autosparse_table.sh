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
mkdir -p runs
keep=benchmarks/results/autosparse_fmnist
for seed in "${seeds[@]}"; do
  for m in autosparse dense str rigl gmp; do
    name="tab_${m}_s${seed}"
    [ -f "$keep/$name/metrics.jsonl" ] && grep -q '"event": "end"' "$keep/$name/metrics.jsonl" && continue
    extra=()
    case $m in rigl|gmp) extra=(method.sparsity=0.85);; esac
    echo "[table] $(date -u +%T) $name"
    bash launch/run.sh ddp --nproc 2 -- --config "configs/tiny_resnet20_${m}.yaml" run.seed="$seed" \
      run.name="$name" "${extra[@]}" > "runs/$name.log" 2>&1 || { echo "[table] $name failed: runs/$name.log"; continue; }
    mkdir -p "$keep/$name" && cp "runs/$name/metrics.jsonl" "runs/$name/config.yaml" "$keep/$name/"
  done
done
PY=python; [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ] && PY=.venv/bin/python
PYTHONPATH=. "$PY" benchmarks/seed_table.py --runs "$keep" dense='tab_dense_s*' autosparse='tab_autosparse_s*' \
  str='tab_str_s*' rigl_85='tab_rigl_s*' gmp_85='tab_gmp_s*'
