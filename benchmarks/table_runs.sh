# Sourced by the *_table.sh scripts: one recorded training run of an accuracy table.
#   record_run KEEP NAME CONFIG [overrides...]
# Skips NAME when KEEP/NAME holds a finished run's metrics.jsonl; else launches CONFIG under DDP with 2
# processes as runs/NAME (log runs/NAME.log) and keeps its metrics.jsonl, config.yaml and plots in KEEP/NAME.
record_run() {
  local keep=$1 name=$2 config=$3; shift 3
  [ -f "$keep/$name/metrics.jsonl" ] && grep -q '"event": "end"' "$keep/$name/metrics.jsonl" && return 0
  echo "[table] $(date -u +%T) $name"
  mkdir -p runs
  bash launch/run.sh ddp --nproc 2 -- --config "$config" run.name="$name" "$@" > "runs/$name.log" 2>&1 ||
    { echo "[table] $name failed: runs/$name.log"; return 0; }
  mkdir -p "$keep/$name" && cp "runs/$name/metrics.jsonl" "runs/$name/config.yaml" "$keep/$name/"
  cp runs/"$name"/*.png "$keep/$name/" 2>/dev/null || true
}

# The project's Python: .venv's unless a virtual environment is active.
table_python() {
  if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ]; then echo .venv/bin/python; else echo python; fi
}
