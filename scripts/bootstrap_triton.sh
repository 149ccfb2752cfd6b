#!/usr/bin/env bash
# Create .venv-triton: the Python environment of the Triton server that nvidia-pytriton ships (tritonserver 2.51,
# Python backend, runs CPU-only), plus tritonclient and the runtime's own dependencies. It is separate from .venv
# because nvidia-pytriton pins numpy<2 (the runtime runs on numpy 1.26 and 2.x alike; tests/test_triton.py checks
# frames bit-identical across the two) and tritonclient's protobuf pin would downgrade the compiler's.
# Idempotent: a second run with the same pins returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-triton
# The runtime's dependencies are pyproject's, numpy excepted (pytriton's numpy<2 pin picks 1.26.4, pinned here).
RUNTIME_DEPS=$("$PY" -c 'import tomllib; print(" ".join(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if not d.startswith("numpy")))')
PINS="nvidia-pytriton==0.7.0 tritonclient[http,grpc]==2.73.0 numpy==1.26.4 $RUNTIME_DEPS"
if [ -x $VENV/bin/python ] && [ "$(cat $VENV/.pins 2>/dev/null)" = "$PINS" ]; then
    exit 0
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
# shellcheck disable=SC2086  # PINS is a list of requirement words
$VENV/bin/python -m pip install -q $PINS
echo "$PINS" > $VENV/.pins
