#!/usr/bin/env bash
# Issue 14's GPU measurements, one command, in priority order under one time budget (default
# 450 s, i.e. under 8 minutes with start-up):
#
#   OUT_DIR=/tmp/gpu14 bash bench/gpu_kernels.sh
#
# Sections: env; before (xla / cudnn / pallas at the 0.7B training shape and sampling stages 0,
# 9, 11, 12, 13 with the shipped tiles: the issue's table); sweep (the Pallas tiles per kernel:
# forward, dk/dv, dq, cache and cache_long, within SWEEP_S seconds; winners written into this
# checkout's hart_jax/kernels/tile_table.json and copied to OUT_DIR); after (the same table with
# the swept tiles, and auto's dispatch table written to OUT_DIR/dispatch_table.json). The
# checkout's tile table is put back at the end: copy the two tables from OUT_DIR into
# hart_jax/kernels/ to keep them. PRESET=tiny runs everything on a CPU at toy sizes
# with the kernels interpreted (dry run).
set -u
OUT_DIR=${OUT_DIR:-/tmp/gpu_kernels}; DEADLINE_S=${DEADLINE_S:-450}; PRESET=${PRESET:-full}; SWEEP_S=${SWEEP_S:-200}
SECTIONS=${SECTIONS:-"env before sweep after"}
source "$(dirname "$0")/gpu_sections.sh"
BENCH="$PY -m bench.attention_bench --stages 0,9,11,12,13 --iters 5"
SWEEP_STAGES=0,8,13
if [ "$PRESET" = tiny ]; then BENCH="$PY -m bench.attention_bench --smoke --stages 2,4"; SWEEP_STAGES=2,4; fi
TILES=hart_jax/kernels/tile_table.json
cp "$TILES" "$OUT_DIR/tile_table.shipped.json"
trap 'cp "$OUT_DIR/tile_table.shipped.json" "$TILES"' EXIT
env_section
section before 60 120 "$BENCH --out $OUT_DIR/before.json"
section sweep 60 $((SWEEP_S + 40)) "$BENCH --impls pallas --sweep --stages $SWEEP_STAGES --sweep-budget-s $SWEEP_S \
  --write-tiles $TILES --out $OUT_DIR/sweep.json && cp $TILES $OUT_DIR/tile_table.json"
section after 60 120 "cp hart_jax/kernels/dispatch_table.json $OUT_DIR/dispatch_table.json && \
  $BENCH --out $OUT_DIR/after.json --write-table $OUT_DIR/dispatch_table.json"
total_line
