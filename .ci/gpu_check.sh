#!/usr/bin/env bash
# The GPU check on a GPU machine without network access.
#
#   bash .ci/gpu_check.sh --download [PYTHON_VERSION] [TRITON_VERSION]   # networked machine, no GPU needed
#   bash .ci/gpu_check.sh [OUT_DIR]                                       # on the GPU machine
#
# --download fills .whl/ (git-ignored: a copy of the working tree to the GPU machine must
# name it, e.g. the device tool's `carry`) with
#   * wheels of the modules the check imports besides torch and Triton, and of the build's
#     requirements (setuptools >= 77, wheel), for the GPU machine's Python (default 3.12);
#   * triton-cache.tar.xz: every Triton kernel the check launches, compiled for sm_90
#     (python -m salt_kernels.tools.aot --warm-cache) by the GPU machine's Triton
#     (default 3.6.0) under that Python, in a small venv of its own (SALT_WARM_VENV, default
#     ~/.cache/salt_kernels/warm-venv-PY-TRITON, made with SALT_WARM_PYTHON or pythonPY;
#     SALT_WARM_TORCH: its torch, default 2.11.0).
#     Its cache keys hold the Triton build and the Python version: a GPU machine with
#     another Triton still runs the check, compiling at run time (the report says so).
# On the GPU machine the wheels are installed (skipped if all are there already) and the
# check runs from this checkout with the warm cache. Every step still writes its report
# if an install fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PKGS="pytest pytest-benchmark hypothesis safetensors matplotlib tqdm ninja setuptools>=77 wheel"
if [ "${1:-}" = "--download" ]; then
  set -e
  py=${2:-3.12}
  triton=${3:-3.6.0}
  pip download --only-binary=:all: --python-version "$py" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl $PKGS
  venv=${SALT_WARM_VENV:-"$HOME/.cache/salt_kernels/warm-venv-$py-$triton"}
  if ! "$venv/bin/python" -c "import torch, triton, sys; sys.exit(triton.__version__ != '$triton')" 2>/dev/null; then
    base=${SALT_WARM_PYTHON:-}
    for c in "python$py" "$HOME"/.pyenv/versions/"$py"*/bin/python"$py"; do
      [ -z "$base" ] && "$c" -c "" 2>/dev/null && base=$c
    done
    [ -n "$base" ] || { echo "gpu_check.sh: no python$py here (set SALT_WARM_PYTHON)"; exit 1; }
    rm -rf "$venv"
    "$base" -m venv "$venv"
    "$venv/bin/pip" install -q "torch==${SALT_WARM_TORCH:-2.11.0}" "triton==$triton"
  fi
  rm -rf .whl/triton-cache .whl/triton-cache.tar.xz
  # the plan (the launches the check makes) is recorded with this machine's torch (PYTHON)
  PYTHONPATH="$PWD" "${PYTHON:-python3}" -c \
    "from salt_kernels.tools.gpucheck.plan import record_plan; print(record_plan('.whl/triton-cache/plan.jsonl'))"
  PYTHONPATH="$PWD" "$venv/bin/python" -m salt_kernels.tools.aot --warm-cache .whl/triton-cache
  tar -C .whl -cJf .whl/triton-cache.tar.xz triton-cache
  rm -rf .whl/triton-cache
  du -sh .whl
  exit
fi
out=${1:-gpucheck-report}
python=${PYTHON:-python3}
if [ -d .whl ] && ! "$python" -c "import pytest, hypothesis, safetensors, matplotlib, tqdm, ninja, wheel
from importlib.metadata import version; import sys; sys.exit(int(version('setuptools').split('.')[0]) < 77)" 2>/dev/null; then
  "$python" -m pip install -q --no-index --find-links .whl $PKGS || echo "gpu_check.sh: installing from .whl/ failed; the environment step will say what is missing"
fi
cache=()
[ -f .whl/triton-cache.tar.xz ] && cache=(--warm-cache .whl/triton-cache.tar.xz)
exec "$python" -m salt_kernels.tools.gpucheck --out "$out" ${cache[@]+"${cache[@]}"}
