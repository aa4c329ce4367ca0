#!/usr/bin/env bash
# The whole scaling pipeline on a CPU in minutes: plan -> run -> fit -> plot over 18 micro models
# (widths 16-96, one layer, 85k-604k parameters, seq 128) at three budgets (1e11, 2e11, 4e11 training
# FLOPs) on the bundled demo corpus, tokenized with the semantic codebook only (mimi:random, an offline
# RANDOM codec; byte-level text; 2,310 ids, so the LM head does not dwarf the model).
#
# It shows that the pieces fit together, not a scaling law: SODA's batch rule gives these runs one
# sequence per step, so the plan raises batches to 8 (--batch-floor 8); the runs then train for 39-802
# steps, and the corpus (150k tokens) is repeated up to 5.5 times at these budgets, so the losses are
# noisy and repetition-bound and the fitted exponents describe nothing beyond this toy.
#
# Usage: benchmarks/tiny_sweep.sh [WORK_DIR]   (default $TMPDIR/soda-tiny-sweep-cb1; PYTHON picks the interpreter)
# Re-running continues: tokens are reused, finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-${TMPDIR:-/tmp}/soda-tiny-sweep-cb1}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1
# One thread: micro models gain nothing from more, and a second busy process oversubscribing the
# cores slows multi-threaded torch by 10x or more.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

step() { echo "\$ soda-scaling $*"; "$PY" -m scaling.cli "$@"; echo; }

if [[ -f $WORK/tokens/manifest.json ]]; then
  echo "reusing the demo tokens in $WORK/tokens"
else
  echo "tokenizing the demo corpus into $WORK/tokens"
  "$PY" -m tokenize_audio.cli demo/corpus/speech demo/corpus/text/kjv_proverbs.txt --out "$WORK/tokens" \
    --codec mimi:random --codebooks 1 --text-tokenizer bytes --quiet
fi
echo
step plan --budgets 1e11,2e11,4e11 --widths 16,24,32,48,64,96 --vocab 2310 --seq-len 128 --batch-floor 8 \
  --out "$WORK/plan.csv"
# Dataloader workers cost more to start than these runs take to train.
step run "$WORK/plan.csv" --data "$WORK/tokens" --out "$WORK/sweep" -- --workers 0
step fit "$WORK/sweep/results.csv" --out "$WORK/sweep/fit"
step plot "$WORK/sweep/fit"
echo "total: ${SECONDS} s"
