#!/usr/bin/env bash
# One launcher for every backend, the same command on a laptop, a CPU box and a GPU node:
#
#   launch/run.sh <backend> [--nproc N] [--port P] [--module M] -- <trainer args>
#   launch/run.sh ddp   --nproc 2 -- --config configs/tiny_resnet20_dense.yaml run.epochs=1
#   launch/run.sh fsdp  -- --config configs/tiny_resnet20_dense.yaml model.norm=gn
#   launch/run.sh zero3 -- --config configs/tiny_resnet20_dense.yaml model.norm=gn
#   launch/run.sh single -- --config configs/tiny_resnet20_dense.yaml run.num_processes=1
#
# <backend>: single | ddp | fsdp | zero1 | zero2 | zero3 (launch/<backend>.yaml; single = one plain process).
# --nproc N: processes (default: the number of CUDA GPUs, or 2 without CUDA).
# --module M: run python module M instead of dist_sparse.train (tests use it).
# What it sets, and why:
#   ACCELERATE_USE_CPU=true  for ddp/fsdp on a machine without CUDA: the YAMLs say MULTI_GPU/FSDP so that
#                            accelerate starts N processes through torchrun; this makes each rank use the
#                            CPU and gloo. Never for zero*: accelerate would drop DeepSpeed silently.
#   OMP_NUM_THREADS          cores / processes unless already set (the ranks share the cores).
#   TMPDIR                   $DIST_SPARSE_SCRATCH or ./runs/tmp: torchrun leaves a torchelastic_* dir per launch.
#   TORCH_EXTENSIONS_DIR     ./runs/torch_extensions unless set: DeepSpeed JIT-compiles CPU ops into it.
#   --main_process_port      a free TCP port (or --port P), so parallel launches do not collide.
# Extra accelerate options can go in $ACCELERATE_ARGS (e.g. "--mixed_precision bf16").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
backend="$1"; shift
nproc=""; port=""; module=dist_sparse.train
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) nproc="$2"; shift 2;;
    --nproc=*) nproc="${1#*=}"; shift;;
    --port) port="$2"; shift 2;;
    --port=*) port="${1#*=}"; shift;;
    --module) module="$2"; shift 2;;
    --) shift; break;;
    -h|--help) usage;;
    *) echo "run.sh: unknown option '$1' before '--' (allowed: --nproc N, --port P, --module M)" >&2; exit 2;;
  esac
done
case "$backend" in
  single|ddp|fsdp|zero1|zero2|zero3) ;;
  *) echo "run.sh: backend = '$backend' is not allowed; expected one of single, ddp, fsdp, zero1, zero2, zero3" >&2; exit 2;;
esac

PY="${PYTHON:-python}"
if [ -x "$root/.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${PYTHON:-}" ]; then
  PY="$root/.venv/bin/python"
fi
ngpu="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [ "$backend" = single ]; then
  nproc=1                                      # one plain process: it gets all the cores
elif [ -z "$nproc" ]; then
  if [ "$ngpu" -gt 0 ]; then nproc="$ngpu"; else nproc=2; fi
fi
case "$nproc" in ''|*[!0-9]*|0) echo "run.sh: --nproc = '$nproc' is not allowed; expected an integer >= 1" >&2; exit 2;; esac

ncores="$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())')"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( ncores / nproc > 0 ? ncores / nproc : 1 ))}"
scratch="${DIST_SPARSE_SCRATCH:-$root/runs/tmp}"
mkdir -p "$scratch"
export TMPDIR="$scratch"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/runs/torch_extensions}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"

# A bad config stops here with one line (exit 2), before any process group is started.
if [ "$module" = dist_sparse.train ]; then
  "$PY" -m dist_sparse.cli check "$@" || exit $?
fi

if [ "$backend" = single ]; then
  unset ACCELERATE_USE_CPU ACCELERATE_USE_DEEPSPEED ACCELERATE_USE_FSDP
  exec "$PY" -m "$module" "$@"
fi

case "$backend" in
  zero*) unset ACCELERATE_USE_CPU;;                 # DeepSpeed + ACCELERATE_USE_CPU = no DeepSpeed at all
  *) if [ "$ngpu" -eq 0 ]; then export ACCELERATE_USE_CPU=true; fi;;
esac
[ -n "$port" ] || port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"

# shellcheck disable=SC2086
exec "$PY" -m accelerate.commands.launch --config_file "$here/$backend.yaml" --num_processes "$nproc" \
  --main_process_port "$port" ${ACCELERATE_ARGS:-} -m "$module" "$@"
