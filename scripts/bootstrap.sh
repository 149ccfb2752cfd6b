#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies. Idempotent: a second run is quick.
# torch comes first and alone: `torch==2.13.0` is the CPU build; any other spec pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[export,test,bench]"
# .venv-triton: the Triton server (nvidia-pytriton, numpy<2) and tritonclient, for serving and tests/test_triton.py
bash scripts/bootstrap_triton.sh || echo "warning: scripts/bootstrap_triton.sh failed; tests/test_triton.py retries it" >&2
