#!/usr/bin/env bash
# The GPU check on a GPU machine without network access.
#
#   bash .ci/gpu_check.sh --download [PYTHON_VERSION]   # on a networked machine: wheels into .whl/
#   bash .ci/gpu_check.sh [OUT_DIR]                      # on the GPU machine
#
# The GPU machine needs CUDA torch, Triton and nvcc; the modules the check's steps import
# besides those (pytest, hypothesis, safetensors, matplotlib, tqdm, ninja) come from .whl/,
# made beforehand for its Python version (default 3.12). The package is not installed: the
# check builds the extension in place for the local GPU and runs from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="pytest pytest-benchmark hypothesis safetensors matplotlib tqdm ninja"
if [ "${1:-}" = "--download" ]; then
  pip download --only-binary=:all: --python-version "${2:-3.12}" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl $PKGS
  exit
fi
python=${PYTHON:-python3}
if [ -d .whl ]; then
  "$python" -m pip install --no-index --find-links .whl $PKGS
fi
exec "$python" -m salt_kernels.tools.gpucheck --out "${1:-gpucheck-report}"
