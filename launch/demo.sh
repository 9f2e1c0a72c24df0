#!/usr/bin/env bash
# The demo: a 2-process DDP training of ResNet-20 on Fashion-MNIST (embedded real data), ending with a
# table of accuracy, time and parameter count. Installs what it needs into .venv first.
#   bash launch/demo.sh [key.sub=value ...]       e.g.  bash launch/demo.sh method.name=rigl
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
exec bash launch/run.sh ddp --nproc 2 -- --config configs/tiny_resnet20_dense.yaml "$@"
