#!/usr/bin/env bash
# Create .venv and install edistill with its test extras, on a fresh machine.
# torch==2.13.0 is installed first and explicitly: it resolves to the CPU
# build, where a bare "torch" requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[${EDISTILL_EXTRAS:-test}]"
