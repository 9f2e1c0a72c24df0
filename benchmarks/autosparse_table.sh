#!/usr/bin/env bash
# The accuracy table of docs/autosparse.md: dense, AutoSparse, STR, RigL and GMP on Fashion-MNIST ResNet-20,
# the demo's recipe (3 epochs, 2 DDP processes), seeds 0 1 2; RigL and GMP at 85 % sparsity, the sparsity the
# learned thresholds reach. Run directories: runs/tab_<method>_s<seed>; a finished run is skipped on a rerun.
#   bash benchmarks/autosparse_table.sh [seeds...]        then: python benchmarks/seed_table.py (see the end)
set -uo pipefail
cd "$(dirname "$0")/.."
seeds=("$@"); [ ${#seeds[@]} -eq 0 ] && seeds=(0 1 2)
mkdir -p runs
for seed in "${seeds[@]}"; do
  for m in autosparse dense str rigl gmp; do
    name="tab_${m}_s${seed}"
    [ -f "runs/$name/metrics.jsonl" ] && grep -q '"event": "end"' "runs/$name/metrics.jsonl" && continue
    extra=()
    case $m in rigl|gmp) extra=(method.sparsity=0.85);; esac
    echo "[table] $(date -u +%T) $name"
    bash launch/run.sh ddp --nproc 2 -- --config "configs/tiny_resnet20_${m}.yaml" run.seed="$seed" \
      run.name="$name" "${extra[@]}" > "runs/$name.log" 2>&1 || echo "[table] $name failed: runs/$name.log"
  done
done
python benchmarks/seed_table.py --runs runs dense='tab_dense_s*' autosparse='tab_autosparse_s*' \
  str='tab_str_s*' rigl_85='tab_rigl_s*' gmp_85='tab_gmp_s*'
