#!/usr/bin/env bash
# The whole scaling pipeline on a CPU in minutes: plan -> run -> fit -> plot over 15 micro models
# (widths 16-64, 0.5-2.2M parameters, seq 128) at three budgets (5e10, 1e11, 2e11 training FLOPs) on the
# bundled demo corpus (mimi:random, an offline RANDOM codec; byte-level text; 16,646 ids).
#
# It shows that the pieces fit together, not a scaling law: these runs train for 55-840 steps of one
# sequence each (SODA's batch rule gives 1 at this scale, so the plan needs --min-batch 1), so the
# losses are noisy and the fitted exponents mean little.
#
# Usage: benchmarks/tiny_sweep.sh [WORK_DIR]   (default $TMPDIR/soda-tiny-sweep; PYTHON picks the interpreter)
# Re-running continues: tokens are reused, finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-${TMPDIR:-/tmp}/soda-tiny-sweep}
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
    --codec mimi:random --text-tokenizer bytes --quiet
fi
echo
step plan --budgets 5e10,1e11,2e11 --widths 16,24,32,48,64 --vocab 16646 --seq-len 128 --min-batch 1 \
  --out "$WORK/plan.csv"
# Dataloader workers cost more to start than these runs take to train.
step run "$WORK/plan.csv" --data "$WORK/tokens" --out "$WORK/sweep" -- --workers 0
step fit "$WORK/sweep/results.csv" --out "$WORK/sweep/fit"
step plot "$WORK/sweep/fit"
echo "total: ${SECONDS} s"
