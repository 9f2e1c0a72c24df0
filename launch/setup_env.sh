#!/usr/bin/env bash
# Create (or update) the project virtual environment .venv and the offline data sets.
#   bash launch/setup_env.sh            # package + runtime dependencies + data
#   bash launch/setup_env.sh dev        # ... plus the test dependencies
# Idempotent: a second run only checks what is there. torch is pinned to 2.14.1 with torchvision 0.29.1
# (the CUDA build, which also runs on a CPU; this machine's pip takes both from its local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=${1:-}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

need_apt=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
[ -f /usr/share/trans/de-en ] || need_apt+=(trans-de-en)
if [ "$EXTRA" = dev ]; then
  for b in slurmctld slurmd sbatch munged; do command -v $b >/dev/null || { need_apt+=(slurmctld slurmd slurm-client munge); break; }; done
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "[setup] missing Debian packages: ${need_apt[*]} -- install them with:" >&2
    echo "        sudo apt-get update && sudo apt-get install -y ${need_apt[*]}" >&2
    echo "        (or point DIST_SPARSE_DATA at a directory holding the data)" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.dist_sparse_${EXTRA:-run}_$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "[setup] installing into .venv (torch==2.14.1, torchvision==0.29.1, timm, accelerate, transformers, ...)"
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  if [ "$EXTRA" = dev ]; then
    .venv/bin/pip install -q -e ".[dev,deepspeed]"
  else
    .venv/bin/pip install -q -e .
  fi
  touch "$stamp"
fi
