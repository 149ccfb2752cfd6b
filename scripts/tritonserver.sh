#!/usr/bin/env bash
# Run the tritonserver binary that nvidia-pytriton ships, from .venv-triton (made by scripts/bootstrap_triton.sh),
# with every argument passed on: `scripts/tritonserver.sh --model-repository REPO [--http-port 8000 ...]`.
# What the bare binary needs, set here: a backend folder holding the Python backend and the stub built for this
# interpreter's version; LD_LIBRARY_PATH with the wheel's bundled libraries (nvidia_pytriton.libs) and this
# interpreter's own libpython (the stub embeds it: a different libpython3.x on the system path breaks imports);
# PATH with the environment's bin first, so that the embedded interpreter finds the environment's packages.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${TRITON_VENV:-$ROOT/.venv-triton}
[ -x "$VENV/bin/python" ] || { echo "error: no $VENV; run scripts/bootstrap_triton.sh first" >&2; exit 2; }
read -r SITE LIBDIR PYVER < <("$VENV/bin/python" -c 'import sys, sysconfig
print(sysconfig.get_paths()["purelib"], sysconfig.get_config_var("LIBDIR"), "%d.%d" % sys.version_info[:2])')
DIST=$SITE/pytriton/tritonserver
STUB=$DIST/python_backend_stubs/$PYVER/triton_python_backend_stub
[ -x "$STUB" ] || { echo "error: nvidia-pytriton has no Python backend stub for Python $PYVER" >&2; exit 3; }
BACKENDS=$VENV/triton-backends
mkdir -p "$BACKENDS/python"
for f in libtriton_python.so triton_python_backend_utils.py; do ln -sf "$DIST/backends/python/$f" "$BACKENDS/python/$f"; done
ln -sf "$STUB" "$BACKENDS/python/triton_python_backend_stub"
export LD_LIBRARY_PATH=$SITE/nvidia_pytriton.libs:$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$VENV/bin:$PATH
exec "$DIST/bin/tritonserver" --backend-directory "$BACKENDS" "$@"
