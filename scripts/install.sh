#!/usr/bin/env bash
# Install soda into ./.venv: Debian tools the tests and demo corpus use, CPU torch, then the package
# (--test adds Debian's chromium, the headless browser the report test opens pages with).
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh --test   # runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# Debian tools that make the demo corpus (demo/make_demo_corpus.py; a test re-runs it), and curl, which
# webdataset runs to stream http(s):// shards: command=package.
need=()
tools="espeak-ng=espeak-ng sox=sox flite=flite bible=bible-kjv curl=curl"
# The test extra also opens the HTML reports in a real browser (tests/test_html_report.py): headless Chromium.
[ -n "$extras" ] && tools="$tools chromium=chromium"
for pair in $tools; do
  command -v "${pair%%=*}" >/dev/null 2>&1 || need+=("${pair#*=}")
done
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" libsndfile1 >/dev/null
  else
    echo "install.sh: please install ${need[*]} with your system's package manager" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# CPU torch first, pinned, so nothing else pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".${extras}"
