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
mkdir -p runs
keep=benchmarks/results/polarization_fmnist
declare -A config=([layer]=configs/tiny_resnet20_polarization.yaml [channel]=configs/tiny_resnet20_polarization_channel.yaml)
for seed in "${seeds[@]}"; do
  for v in layer channel; do
    name="poltab_${v}_s${seed}"
    [ -f "$keep/$name/metrics.jsonl" ] && grep -q '"event": "end"' "$keep/$name/metrics.jsonl" && continue
    echo "[table] $(date -u +%T) $name"
    bash launch/run.sh ddp --nproc 2 -- --config "${config[$v]}" run.seed="$seed" run.name="$name" \
      > "runs/$name.log" 2>&1 || { echo "[table] $name failed: runs/$name.log"; continue; }
    mkdir -p "$keep/$name" && cp "runs/$name/metrics.jsonl" "runs/$name/config.yaml" "$keep/$name/"
    cp runs/$name/polarization_*.png "$keep/$name/" 2>/dev/null
  done
done
PY=python; [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ] && PY=.venv/bin/python
PYTHONPATH=. "$PY" benchmarks/seed_table.py --runs "$keep" dense='../autosparse_fmnist/tab_dense_s*' layer='poltab_layer_s*' \
  channel='poltab_channel_s*'
