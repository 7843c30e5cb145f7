"""The plain op of the ``cpu`` and ``cuda`` backends (compiled torch extension ``salt_kernels._C``).

The ops are defined once in C++ (``csrc/salt_ops.cpp``: ``salt_kernels::salt_forward``
and ``salt_kernels::salt_backward``, contract in :mod:`.autograd`) and implemented once
(``csrc/salt_linear.cpp``, ATen GEMMs), registered for CPU and, when built with CUDA,
for CUDA; the few device differences are in ``csrc/device.h``. Autograd is
registered in C++ too (``csrc/salt_autograd.cpp``); this module adds the fake kernels
(for ``torch.compile`` and meta tensors).

Importing it raises ImportError when the extension was not built or fails to load;
:mod:`salt_kernels.ops.dispatch` turns that into a fallback with one warning.
"""

from __future__ import annotations

import torch

from ..autograd import run_salt_op

try:
    from ... import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # not built (SALT_KERNELS_NO_EXTENSION, failed build) or ABI mismatch
    raise ImportError(
        f"the compiled extension salt_kernels._C is not available ({exc}); reinstall with "
        "`pip install --no-build-isolation -e .` (a C++ compiler is required; CUDA kernels "
        "also need a CUDA toolkit and a CUDA build of torch)"
    ) from exc

FORWARD_OP = "salt_kernels::salt_forward"
BACKWARD_OP = "salt_kernels::salt_backward"
salt_forward = torch.ops.salt_kernels.salt_forward.default
salt_backward = torch.ops.salt_kernels.salt_backward.default


def _check_one_device(op: str, **tensors) -> None:
    """The kernels' own check (csrc/salt_linear.cpp), for the fake/meta path."""
    (first, t0), *rest = [(n, t) for n, t in tensors.items() if t is not None]
    for name, t in rest:
        if t.device != t0.device:
            raise RuntimeError(f"salt_kernels.{op}: {name} is on {t.device} but {first} is on {t0.device}; "
                               "all tensor arguments must be on one device")


@torch.library.register_fake(FORWARD_OP)
def _salt_forward_fake(x, U, V, C, bias):
    _check_one_device("salt_forward", x=x, U=U, V=V, C=C, bias=bias)
    M = x.shape[0]
    return x.new_empty(M, U.shape[0]), x.new_empty(M, V.shape[1], dtype=C.dtype)


@torch.library.register_fake(BACKWARD_OP)
def _salt_backward_fake(G, Z, U, V, C, need_dx, need_dC, need_db):
    _check_one_device("salt_backward", G=G, Z=Z, U=U, V=V, C=C)
    M, r = G.shape[0], C.shape[0]
    return (G.new_empty(M, V.shape[0]) if need_dx else G.new_empty(0),
            C.new_empty(r, r) if need_dC else C.new_empty(0),
            G.new_empty(G.shape[1]) if need_db else G.new_empty(0))


# Autograd is registered in C++ (csrc/salt_autograd.cpp: the contract of .autograd),
# because the Python wrapper costs more per call than a decode-size layer on CPU.


def cpu_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ``cpu`` kernels run their large GEMMs in for inputs of ``dtype``:
    float32 for float16/float32 (float64 for float64); for bfloat16, bfloat16 (oneDNN,
    fp32 accumulation, bf16-rounded intermediates as in a plain bf16 chain) on CPUs with
    AVX512-BF16 or AMX unless ``SALT_KERNELS_CPU_BF16_GEMM=0``, else float32."""
    code = torch.ops.salt_kernels.cpu_gemm_dtype(dtype)  # a c10::ScalarType comes back as its int
    return _SCALAR_TYPES[code]


# c10::ScalarType codes of the floating dtypes (stable: part of the serialization format).
_SCALAR_TYPES = {5: torch.float16, 6: torch.float32, 7: torch.float64, 15: torch.bfloat16}


def has_kernel(device_type: str) -> bool:
    """Whether the extension was built with kernels for ``device_type`` ("cpu"/"cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key) for op in (FORWARD_OP, BACKWARD_OP))


def availability(device: torch.device, backend: str) -> str | None:
    if device.type != backend:
        return f"the '{backend}' backend runs on {backend} tensors, got a {device.type} tensor"
    if backend == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if not has_kernel(backend):
        return (f"salt_kernels._C was built without {backend.upper()} kernels (reinstall where torch sees "
                "the GPU, or with SALT_KERNELS_BUILD_CUDA=1; it needs a CUDA build of torch and a CUDA toolkit: "
                "CUDA_HOME or /usr/local/cuda)")
    return None


def salt_linear_2d(x, U, V, sigma, X, Y, bias, scaling: float):
    return run_salt_op(salt_forward, x, U, V, sigma, X, Y, bias, scaling)
