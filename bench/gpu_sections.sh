# Shared by bench/gpu_*.sh: one GPU session's measurements in priority order under one time
# budget. Source it after setting OUT_DIR and DEADLINE_S; then `section NAME NEED_S MAX_S CMD`
# runs CMD (a bash string) under `timeout`, its output in OUT_DIR/NAME.log, skipped when fewer
# than NEED_S seconds of the budget are left; every section's status goes to OUT_DIR/summary.txt.
# SECTIONS (space-separated names) limits the run to those sections. WHEEL_DIR: Python wheels to
# install first (--no-deps, into /tmp/site) for a bare GPU image.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}; START=$(date +%s)
mkdir -p "$OUT_DIR"; : > "$OUT_DIR/summary.txt"
export PYTHONPATH="/tmp/site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEEL_DIR:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEEL_DIR"/*.whl
fi
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
section() {  # name needed_s max_s command...
  local name=$1 need=$2 max=$3; shift 3
  case " $SECTIONS " in *" $name "*) ;; *) return;; esac
  local l; l=$(left)
  if [ "$l" -lt "$need" ]; then echo "== $name: skipped ($l s left, needs $need)" | tee -a "$OUT_DIR/summary.txt"; return; fi
  [ "$max" -gt $((l - 5)) ] && max=$((l - 5))
  local t0; t0=$(date +%s)
  echo "== $name (limit $max s)"
  timeout -k 5 "$max" bash -c "$*" > "$OUT_DIR/$name.log" 2>&1
  echo "== $name: rc=$? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT_DIR/summary.txt"
  tail -n 12 "$OUT_DIR/$name.log"
}
env_section() {  # the GPU, driver, versions and commit
  section env 0 30 "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null; \
    $PY -c 'import sys, jax, flax; print(sys.version.split()[0], jax.__version__, flax.__version__, jax.devices())'; \
    $PY -c 'import torch; print(\"torch\", torch.__version__)' 2>/dev/null; git log -1 --oneline 2>/dev/null"
}
total_line() { echo "== total $(( $(date +%s) - START )) s" | tee -a "$OUT_DIR/summary.txt"; }
