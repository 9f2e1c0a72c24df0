#!/usr/bin/env bash
# The accuracy table of docs/cuttlefish.md: full-rank ResNet-18 (quarter width, CIFAR stem) and Cuttlefish on
# Fashion-MNIST, 12 epochs, 2 DDP processes, seeds 0 1 2 (configs/tiny_resnet18_dense.yaml and
# configs/tiny_resnet18_cuttlefish.yaml). Run directories: runs/cftab_<variant>_s<seed>; the record of each
# finished run (metrics.jsonl, config.yaml, plots) is kept in benchmarks/results/cuttlefish_fmnist/, a run
# recorded there is not run again, and the table is printed from the records at the end.
#   bash benchmarks/cuttlefish_table.sh [seeds...]
set -uo pipefail
cd "$(dirname "$0")/.."
seeds=("$@"); [ ${#seeds[@]} -eq 0 ] && seeds=(0 1 2)
mkdir -p runs
keep=benchmarks/results/cuttlefish_fmnist
for seed in "${seeds[@]}"; do
  for v in cuttlefish dense; do
    name="cftab_${v}_s${seed}"
    [ -f "$keep/$name/metrics.jsonl" ] && grep -q '"event": "end"' "$keep/$name/metrics.jsonl" && continue
    echo "[table] $(date -u +%T) $name"
    bash launch/run.sh ddp --nproc 2 -- --config "configs/tiny_resnet18_${v}.yaml" run.num_processes=2 \
      run.seed="$seed" run.name="$name" > "runs/$name.log" 2>&1 || { echo "[table] $name failed: runs/$name.log"; continue; }
    mkdir -p "$keep/$name" && cp "runs/$name/metrics.jsonl" "runs/$name/config.yaml" "$keep/$name/"
    cp runs/$name/*.png "$keep/$name/" 2>/dev/null
  done
done
PY=python; [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ] && PY=.venv/bin/python
[ -d "$keep" ] && PYTHONPATH=. "$PY" benchmarks/seed_table.py --runs "$keep" dense='cftab_dense_s*' cuttlefish='cftab_cuttlefish_s*'
