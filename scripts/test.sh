#!/usr/bin/env bash
# Run the test suite offline (no hub downloads). pytest exits 5 when it collects nothing: that fails too, as does
# a marker expression that deselects every test. The quick loop: `bash scripts/test.sh -m "not slow"` (CI runs all).
# Two pytest-xdist workers, a file each at a time (a file's module fixtures are built once), one torch thread per
# process: the tiny models run fastest single-threaded, and two workers keep two cores busy (about 15 minutes on two
# cores, against about 24 in one process). SODA_TEST_WORKERS=N sets the workers (0: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -n "${SODA_TEST_WORKERS:-2}" --dist loadfile "$@"
