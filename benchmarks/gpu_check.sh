#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one go (about 5-8 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
# 1. tokenizes the demo corpus with the full-size random Mimi on the GPU (8 codebooks; bytes text tokenizer),
# 2. the LM-head loss three ways at one 135m micro-batch (8 x 4096 tokens),
# 3. soda-train's step vs a bare loop for 135m (micro-batch 8) and 600m (micro-batch 4) at seq 4096 in bf16,
#    with SODA's 144,644-id vocabulary (the data's ids are a subset), flex attention (the GPU default), eager
#    and --compile'd, and sdpa's dense mask for comparison.
# Needs a Python with torch (CUDA), transformers, lightning, webdataset, torchdata, soundfile and tokenizers;
# PYTHON picks it (default python3). Every step's output is kept in RESULTS_DIR (default runs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() {  # step NAME COMMAND...: run, keep its log, go on after a failure
    local name=$1; shift
    echo "== $name: $*" | tee "$OUT/$name.log"
    timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1 | grep -v -i "warn" | tee -a "$OUT/$name.log" | tail -12
}
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
TOKENS="$OUT/tokens"
[ -f "$TOKENS/manifest.json" ] || step tokenize "$PY" -m tokenize_audio.cli demo/corpus/speech \
    demo/corpus/text/kjv_proverbs.txt --out "$TOKENS" --codec mimi:random-full --text-tokenizer bytes --quiet
step lm_loss "$PY" benchmarks/lm_loss.py --tokens 32768 --width 512 --iters 5
T="$PY benchmarks/train_throughput.py --data $TOKENS --seq-len 4096 --steps 15 --vocab-size 144644"
step 135m_flex_compile $T --size 135m --micro-batch 8 --compile
step 135m_flex $T --size 135m --micro-batch 8 --skip-bare
step 135m_sdpa $T --size 135m --micro-batch 8 --attention sdpa --skip-bare
step 600m_flex_compile $T --size 600m --micro-batch 4 --compile
step 600m_flex $T --size 600m --micro-batch 4 --skip-bare
echo "logs in $OUT"
