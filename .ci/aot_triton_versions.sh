#!/usr/bin/env bash
# The ahead-of-time compile check (python -m salt_kernels.tools.aot: every launch specialisation,
# sm_80 and sm_90, no spills, register headroom) on every supported Triton. Each version
# gets a small venv (a CPU torch and that Triton), created once and reused; the check runs
# on this source tree (PYTHONPATH), so no other environment is needed. Extra arguments go
# to salt_kernels.tools.aot (e.g. --jobs 1, --full).
#   SALT_AOT_TRITONS  versions to check (default: the supported range's ends and middle)
#   SALT_AOT_VENVS    where the venvs live
#   SALT_AOT_TORCH    the torch requirement installed next to each Triton
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=${SALT_AOT_TRITONS:-"3.6.0 3.8.0 3.9.0"}
VENVS=${SALT_AOT_VENVS:-"$HOME/.cache/salt_kernels/aot-venvs"}
TORCH=${SALT_AOT_TORCH:-"torch==2.13.0"}
args=()
driver=""
for v in $VERSIONS; do
    d="$VENVS/triton-$v"
    if ! "$d/bin/python" -c "import sys, torch, triton; sys.exit(triton.__version__ != '$v')" 2>/dev/null; then
        rm -rf "$d"
        python3 -m venv "$d"
        "$d/bin/pip" install -q "$TORCH" "triton==$v"
    fi
    args+=(--triton-venv "$d")
    driver=${driver:-"$d/bin/python"}
done
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$driver" -m salt_kernels.tools.aot "${args[@]}" "$@"
