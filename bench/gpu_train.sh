#!/usr/bin/env bash
# Issue 15's GPU measurements, one command, in priority order under one time budget (default
# 450 s, i.e. under 8 minutes with start-up): the 0.7B training step (1024 px, precomputed codes,
# the most kept tokens token dropping draws: 2048 of 4096) at the largest batch the compiled
# step's memory analysis predicts per remat policy (docs/training.md), each its own process:
#
#   OUT_DIR=/tmp/gpu15 bash bench/gpu_train.sh
#
# Sections: env; full16 (the 16-image target, remat full); fullmax, dotsmax, nonemax (the
# largest batch per policy the memory table predicts: 28 / 8 / 3 on a 141 GB GPU, 12 / 4 / 2 on
# an 80 GB one, read from nvidia-smi); b4none (batch 4, no remat, n_keep 1024: the issue's
# earlier H200 setting, for comparison). Each JSON (OUT_DIR/<section>.json) holds tokens/s, tokens/s per device, MFU on
# useful and dense FLOPs and the GPU compiler's temporaries; an out-of-memory error means the
# next smaller batch is the largest that fits. PEAK_TFLOPS (default 0: the bench's table of
# known GPUs) sets the peak. PRESET=tiny runs everything on a CPU at toy sizes (dry run).
set -u
OUT_DIR=${OUT_DIR:-/tmp/gpu_train}; DEADLINE_S=${DEADLINE_S:-450}; PRESET=${PRESET:-full}
SECTIONS=${SECTIONS:-"env full16 fullmax dotsmax nonemax b4none"}
source "$(dirname "$0")/gpu_sections.sh"
if [ "$PRESET" = tiny ]; then
  BENCH="$PY -m bench.train_bench --preset tiny_t2i --codes --steps 2 --repeats 1"; KEEP=""; B16=4; B28=6; B8=2; B3=2; B4=2
else
  BENCH="$PY -m bench.train_bench --preset hart_0p7b_1024 --codes --steps 3 --repeats 2 --peak-tflops ${PEAK_TFLOPS:-0}"
  KEEP="--n-keep 2048"; B16=16; B4=4
  MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
  if [ "${MEM_MIB:-0}" -ge 120000 ]; then B28=28; B8=8; B3=3; else B28=12; B8=4; B3=2; fi
fi
run() {  # section need max remat batch [extra args]
  local name=$1 need=$2 max=$3 remat=$4 batch=$5; shift 5
  section "$name" "$need" "$max" "$BENCH --remat $remat --batch $batch ${*:-$KEEP} --out $OUT_DIR/$name.json"
}
env_section
run full16 90 150 full $B16
run fullmax 90 150 full $B28
run dotsmax 80 120 dots $B8
run nonemax 70 110 none $B3
if [ "$PRESET" = tiny ]; then run b4none 40 80 none $B4; else run b4none 70 110 none $B4 --n-keep 1024; fi
total_line
