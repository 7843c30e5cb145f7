"""The one place that chooses a backend for :func:`salt_linear`.

``backend="auto"`` picks by the device of ``x`` and the token count M, from one policy
table, :data:`AUTO_POLICY`:

* CUDA: ``triton`` -> ``cuda`` -> ``reference`` (a default, not yet measured on a GPU:
  the fused Triton kernels first; the ``cuda`` extension runs the chain on cuBLAS, so it
  is never far from ``reference`` and saves memory)
* CPU:  ``reference`` up to M = 1024 tokens, where both run the same GEMMs and the
  extension's fixed cost per call made it 0.90-0.98x the reference (measured); above,
  ``cpu`` -> ``reference`` (the extension's large outputs on huge pages, fewer passes
  over the M-sized tensors, its autograd in C++, Z saved instead of x)

Optional pieces (Triton, the compiled extension) may be missing: ``auto`` then falls
back and warns once per reason. An explicitly requested backend that cannot run raises
:class:`BackendUnavailableError` saying why and how to get it.
"""

from __future__ import annotations

import importlib
import math
import warnings

import torch

from ._validate import validate_salt_args
from .backends.core import autocast_active

# backend name -> module implementing it (imported lazily: optional pieces may be absent)
_BACKEND_MODULES = {
    "reference": "salt_kernels.backends.reference",
    "triton": "salt_kernels.backends.triton_kernels",
    "cuda": "salt_kernels.backends.extension",
    "cpu": "salt_kernels.backends.extension",
}

# The auto policy: device type -> rows (largest M the row covers, or None for any M;
# backends in order of preference). The first row whose bound covers M applies. Rows are
# filled from benchmark measurements, never guessed: salt-bench prints the rows a run
# supports (bench.measured_policy; the GPU check reports them for CUDA), and a test
# checks the CPU rows against docs/bench-cpu/auto-vs-reference. A device with one row
# never looks at M. Under torch.compile the last row
# applies whatever M is, so one graph serves every token count (dynamic shapes): a
# size-dependent row would otherwise specialise the graph on M.
AUTO_POLICY: dict[str, tuple[tuple[int | None, tuple[str, ...]], ...]] = {
    "cuda": ((None, ("triton", "cuda", "reference")),),  # GPU default until measured
    # salt-bench --presets auto-vs-reference, idle 2-core AMD EPYC, fp32, the three
    # shapes: cpu was 0.80-0.90x reference at M = 16, 0.95-0.99x forward at M = 256 and
    # 1024 (the same GEMMs plus its fixed cost per call); at M = 4096 0.99-1.22x forward,
    # 1.03-1.25x forward+backward.
    "cpu": ((1024, ("reference",)), (None, ("cpu", "reference"))),
}


def auto_order(device_type: str, M: int | None = None) -> tuple[str, ...]:
    """The ``auto`` preference order for ``device_type`` at M tokens (None: the order
    used when M is unknown, i.e. the last row)."""
    rows = AUTO_POLICY.get(device_type, ((None, ("reference",)),))
    if M is not None:
        for bound, order in rows:
            if bound is None or M <= bound:
                return order
    return rows[-1][1]


def _policy_row(device_type: str, M=None, x=None) -> int:
    """Index of the AUTO_POLICY row for M tokens (or x's rows, counted only if needed);
    0 without looking at M when the device has one row; the last row for M=None and
    while torch.compile traces (M may be symbolic)."""
    rows = AUTO_POLICY.get(device_type, ())
    if len(rows) <= 1 or torch.compiler.is_compiling() or (M is None and x is None):
        return max(len(rows) - 1, 0)
    if M is None:
        M = math.prod(x.shape[:-1])
    return next(i for i, (bound, _) in enumerate(rows) if bound is None or M <= bound)

_warned: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run on this machine or device."""


def _module(name: str):
    try:
        return importlib.import_module(_BACKEND_MODULES[name]), None
    except ImportError as exc:  # Triton or the built extension missing
        return None, f"{type(exc).__name__}: {exc}"


def unavailable_reason(name: str, device) -> str | None:
    """None if backend ``name`` can run on ``device``; otherwise why not, and how to fix it."""
    device = torch.device(device)
    mod, err = _module(name)
    if mod is None:
        return f"the '{name}' backend could not be imported ({err})"
    return mod.availability(device, name)


def available_backends(device="cpu") -> list[str]:
    """Backends usable for tensors on ``device``, fastest first (the ``auto`` order,
    then any other backend that can run there, e.g. ``triton`` on CPU under
    ``TRITON_INTERPRET=1``)."""
    device = torch.device(device)
    order = list(auto_order(device.type))
    order += [b for b in _BACKEND_MODULES if b not in order]
    return [b for b in order if unavailable_reason(b, device) is None]


def resolve_backend(backend: str, device, rank: int = 1, M: int | None = None) -> str:
    """The concrete backend that ``backend`` ("auto" or a name) runs on ``device`` for
    a layer of rank ``rank`` at M tokens (None: as under torch.compile)."""
    device_type = torch.device(device).type
    return _pick(_candidates(backend, device_type, _policy_row(device_type, M)), backend, rank)


def _max_rank(name: str) -> int | None:
    """The largest rank backend ``name`` supports (``MAX_RANK`` in its module), or None."""
    return getattr(_module(name)[0], "MAX_RANK", None)


# The candidates depend only on (backend, device type, policy row) and on what is
# installed, so they are cached and, for torch.compile, treated as a constant: Dynamo then
# never traces the imports and warnings below, and `fullgraph=True` holds. The rank is
# compared with the candidates' limits in traced code (_pick): under torch.compile a
# symbolic rank (U an input of a compiled function with dynamic=True) becomes a guard
# `rank <= limit` instead of failing the constant.
@torch.compiler.assume_constant_result
def _candidates(backend: str, device_type: str, row: int = 0) -> tuple:
    key = (backend, device_type, row)
    if key not in _RESOLVED:
        _RESOLVED[key] = _candidates_uncached(backend, torch.device(device_type), row)
        for name, _ in _RESOLVED[key]:
            _IMPLS[name] = _module(name)[0].salt_linear_2d
    return _RESOLVED[key]


_RESOLVED: dict[tuple[str, str, int], tuple] = {}
_IMPLS: dict = {}  # backend name -> salt_linear_2d of its module


def _candidates_uncached(backend: str, device: torch.device, row: int) -> tuple:
    """((name, rank limit or None), ...): the backends to try, in order."""
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend='{backend}' is not available: {reason}")
        return ((backend, _max_rank(backend)),)
    rows = AUTO_POLICY.get(device.type, ((None, ("reference",)),))
    order = rows[min(row, len(rows) - 1)][1]
    out = []
    for name in order:
        reason = unavailable_reason(name, device)
        if reason is None:
            out.append((name, _max_rank(name)))
        elif reason not in _warned:
            _warned.add(reason)
            warnings.warn(
                f"salt_kernels: skipping backend '{name}' on {device.type}: {reason}. "
                f"Falling back to the next of {order}.",
                RuntimeWarning,
                stacklevel=6,
            )
    if not any(name == "reference" for name, _ in out):
        out.append(("reference", None))
    return tuple(out)


def _pick(candidates: tuple, backend: str, rank) -> str:
    """The first candidate whose rank limit admits ``rank`` (over the limit under "auto"
    is by design, not a missing piece: no warning)."""
    for name, limit in candidates:
        if limit is None or rank <= limit:
            return name
    name, limit = candidates[0]
    raise ValueError(
        f"U: backend='{backend}' supports rank <= {limit}, got rank {rank}; "
        f"use backend='auto' to run larger ranks on another backend"
    )


def clear_backend_cache() -> None:
    """Forget resolved backends (e.g. after building the extension or setting
    TRITON_INTERPRET in a running process)."""
    _RESOLVED.clear()
    _IMPLS.clear()
    _warned.clear()
    from . import multi_adapter  # its mixed-adapter resolutions build on these

    multi_adapter._resolved.clear()


def salt_linear(x, U, V, sigma, X, Y, bias=None, *, scaling: float = 1.0, backend: str = "auto",
                adapter_index=None, base_sigma=None, base_bias=None):
    """SALT linear layer: ``y = U @ ((diag(sigma) + scaling * X @ Y) @ (V^T @ x)) + bias``.

    Shapes: ``x (..., K)`` (including 1-D and empty batches), ``U (D, r)``, ``V (K, r)``,
    ``sigma (r,)``, ``X (r, r')``, ``Y (r', r)``, ``bias (D,)`` or None. Returns
    ``(..., D)`` in x's dtype (or the autocast dtype inside ``torch.autocast``).
    Differentiable in every tensor argument.

    Mixed-adapter batches: with ``adapter_index`` (int64, one entry per row of x, in
    ``[-1, A)``), ``sigma``, ``X``, ``Y`` are banks ``(A, r)``, ``(A, r, r')``,
    ``(A, r', r)``, ``bias`` is ``(D,)`` or ``(A, D)``, and ``-1`` rows use the base
    layer ``diag(base_sigma)`` (and ``base_bias``): see :mod:`salt_kernels.multi_adapter`.
    """
    if adapter_index is not None or base_sigma is not None or base_bias is not None:
        from .multi_adapter import salt_linear_multi

        return salt_linear_multi(x, U, V, sigma, X, Y, bias, scaling=scaling, backend=backend,
                                 adapter_index=adapter_index, base_sigma=base_sigma, base_bias=base_bias)
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None:
        # Behave like nn.Linear under autocast: compute in the autocast dtype, whatever
        # dtypes x and the weights came in (so cast before the dtype checks).
        x, U, V, bias = (t.to(autocast_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                         for t in (x, U, V, bias))
    validate_salt_args(x, U, V, sigma, X, Y, bias, scaling, backend)
    if autocast_dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return _run(x, U, V, sigma, X, Y, bias, float(scaling), backend)
    return _run(x, U, V, sigma, X, Y, bias, float(scaling), backend)


def _autocast_dtype(x):
    """The dtype autocast computes x's layer in, or None (autocast off; float64 x, which
    autocast leaves alone; an x that validation will reject)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    device_type = x.device.type
    if autocast_active(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _run(x, U, V, sigma, X, Y, bias, scaling, backend):
    device_type = x.device.type
    row = _policy_row(device_type, x=x) if backend == "auto" else 0
    name = _pick(_candidates(backend, device_type, row), backend, U.shape[1])
    lead = x.shape[:-1]
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y2d = _IMPLS[name](x2d, U, V, sigma, X, Y, bias, scaling)
    return y2d if x.dim() == 2 else y2d.reshape(*lead, U.shape[0])
