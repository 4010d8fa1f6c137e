#!/usr/bin/env bash
# Create .venv and install edistill with what the demo needs, on a fresh machine.
# Idempotent: re-running only installs what is missing.
#
#   EDISTILL_EXTRAS  comma-separated extras of pyproject.toml to install
#                    (default "plot": matplotlib, for the demo's demo.png).
#                    scripts/test.sh sets "plot,test"; "" installs edistill alone.
#   PYTHON           the interpreter that makes .venv (default python3).
#
# torch==2.13.0 is installed first and explicitly: it resolves to the CPU
# build, where a bare "torch" requirement would pull a multi-GB CUDA build.
# An existing torch in .venv is kept (install a GPU build there first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EDISTILL_EXTRAS-plot}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
