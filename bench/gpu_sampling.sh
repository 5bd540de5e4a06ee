#!/usr/bin/env bash
# Issue 13's GPU measurements, one command, in priority order under one time budget (default
# 450 s, i.e. under 8 minutes with start-up): each section is its own process under `timeout`,
# skipped when too little of the budget is left; every log and JSON lands in OUT_DIR.
#
#   HART_SRC=<copy of the original hart source> OUT_DIR=/tmp/gpu13 bash bench/gpu_sampling.sh
#
# Sections: env; compare (the original and hart-jax at 1024 px, batch 1 and 8, one process
# tree: bench/sample_bench.py --compare-original); ttfi (time to first image: two fresh
# processes on one empty persistent compilation cache, cold then warm); table (the attention
# times of every sampling stage, written into auto's dispatch table, a copy in OUT_DIR);
# cudnn (batch 8 with attention_impl=cudnn); batches (16 and 32 images per call); hlo (copies /
# transposes / converts per stage of the batch-8 program). Without HART_SRC the compare section
# times hart-jax alone. PRESET=tiny runs the script on a CPU in a few minutes (dry run; no cudnn).
# WHEEL_DIR, SECTIONS, PY: see bench/gpu_sections.sh.
set -u
OUT_DIR=${OUT_DIR:-/tmp/gpu_sampling}; DEADLINE_S=${DEADLINE_S:-450}; PRESET=${PRESET:-full}
SECTIONS=${SECTIONS:-"env compare ttfi table cudnn batches hlo"}
source "$(dirname "$0")/gpu_sections.sh"
BENCH="$PY bench/sample_bench.py --preset $PRESET"
ORIG=""; [ -n "${HART_SRC:-}" ] && ORIG="--compare-original"
if [ "$PRESET" = tiny ]; then SMALL=1; else SMALL=0; fi
CACHE="$OUT_DIR/jax_cache"; rm -rf "$CACHE"

env_section
section compare 120 260 "$BENCH --batch-sizes 1 8 --repeats 5 $ORIG --json $OUT_DIR/compare.json"
section ttfi 60 150 "for run in cold warm; do t0=\$(date +%s.%N); \
  $BENCH --batch-sizes 1 --repeats 1 --compile-cache $CACHE --json $OUT_DIR/ttfi_\$run.json | tail -n 1; \
  echo \"\$run: process wall \$(awk \"BEGIN{print \$(date +%s.%N) - \$t0}\") s\"; done"
if [ $SMALL = 1 ]; then TABLE_ARGS="--smoke"; else TABLE_ARGS="--iters 5"; fi
section table 45 120 "cp hart_jax/kernels/dispatch_table.json $OUT_DIR/dispatch_table.json && \
  $PY -m bench.attention_bench $TABLE_ARGS --out $OUT_DIR/attention.json --write-table $OUT_DIR/dispatch_table.json"
[ $SMALL = 1 ] || section cudnn 90 200 "$BENCH --batch-sizes 8 --repeats 3 --attention-impl cudnn --json $OUT_DIR/cudnn.json"
section batches 120 240 "$BENCH --batch-sizes 16 32 --repeats 3 --json $OUT_DIR/batches.json"
section hlo 60 150 "$PY bench/hlo_stats.py --preset $PRESET --batch 8 --json $OUT_DIR/hlo.json"
total_line
