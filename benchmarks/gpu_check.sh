#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one go (about 5-8 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
# 1. tokenizes the demo corpus with the full-size random Mimi on the GPU (8 codebooks; bytes text tokenizer),
# 2. soda-train's step for 135m (micro-batch 8) and 600m (micro-batch 4) at seq 4096 in bf16 with SODA's
#    144,644-id vocabulary (the data's ids are a subset): flex attention (the GPU default) --compile'd and eager,
#    sdpa's dense mask for comparison, and once a bare PyTorch loop (the framework's overhead),
# 3. the LM-head loss three ways at one 135m micro-batch (8 x 4096 tokens).
# Needs a Python with torch (CUDA), transformers, lightning, webdataset, soundfile and tokenizers;
# PYTHON picks it (default python3). Every step's output is kept in RESULTS_DIR (default runs/gpu_check).
# A quick rehearsal on a CPU (small sizes; checks the script, not the figures):
#   SMALL=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh runs/gpu_rehearsal
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() {  # step NAME COMMAND...: run, keep its log, go on after a failure
    local name=$1; shift
    echo "== $name: $*" | tee "$OUT/$name.log"
    timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1 | grep -v -i -E "warn|tip:|available:|set_vital|LeafSpec|validation_step" | tee -a "$OUT/$name.log" | tail -12
}
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" \
    | tee "$OUT/device.txt"
if [ -n "${SMALL:-}" ]; then  # rehearsal sizes
    CODEC=mimi:random; LOSS="--tokens 1024 --width 64 --iters 1"; SEQ=128; STEPS=2; A=tiny; B=tiny; MA=2; MB=2
    FLEX=sdpa  # torch has no flex attention backward on the CPU
else
    CODEC=mimi:random-full; LOSS="--tokens 32768 --width 512 --iters 5"; SEQ=4096; STEPS=15; A=135m; B=600m; MA=8; MB=4
    FLEX=auto
fi
TOKENS="$OUT/tokens"
[ -f "$TOKENS/manifest.json" ] || step tokenize "$PY" -m tokenize_audio.cli demo/corpus/speech \
    demo/corpus/text/kjv_proverbs.txt --out "$TOKENS" --codec $CODEC --text-tokenizer bytes --quiet
T="$PY benchmarks/train_throughput.py --data $TOKENS --seq-len $SEQ --steps $STEPS --vocab-size 144644"
# most important first, in case the time runs out: the MFU goal is about soda-train's own step
step ${A}_flex_compile $T --size $A --micro-batch $MA --attention $FLEX --compile --skip-bare
step ${B}_flex_compile $T --size $B --micro-batch $MB --attention $FLEX --compile --skip-bare
step ${A}_flex $T --size $A --micro-batch $MA --attention $FLEX          # also the bare loop: framework overhead
step ${A}_sdpa $T --size $A --micro-batch $MA --attention sdpa --skip-bare
step ${B}_flex $T --size $B --micro-batch $MB --attention $FLEX --skip-bare
step lm_loss "$PY" benchmarks/lm_loss.py $LOSS
echo "logs in $OUT"
