"""The op: :func:`salt_linear` validates its arguments once, resolves a backend once
(:mod:`.dispatch`) and runs it, for plain and mixed-adapter calls alike."""

from __future__ import annotations

import torch

from ..backends.core import autocast_active, autocast_may_be_on
from . import dispatch
from .multi_adapter import validate_multi_args
from .validate import validate_salt_args


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
    layer ``diag(base_sigma)`` (and ``base_bias``): see :mod:`salt_kernels.ops.multi_adapter`.
    """
    mixed = adapter_index is not None or base_sigma is not None or base_bias is not None
    return _call(x, U, V, sigma, X, Y, bias, scaling, backend, mixed, adapter_index, base_sigma, base_bias, True)


def salt_linear_multi(x, U, V, sigma, X, Y, bias=None, *, scaling: float = 1.0, backend: str = "auto",
                      adapter_index, base_sigma=None, base_bias=None, check_range: bool = True):
    """:func:`salt_linear` with ``adapter_index``; ``check_range=False`` skips the range
    check of the index (one host synchronisation on CUDA) for an index built from
    checked names, as :func:`salt_kernels.adapters` does."""
    return _call(x, U, V, sigma, X, Y, bias, scaling, backend, True, adapter_index, base_sigma, base_bias,
                 check_range)


def _call(x, U, V, sigma, X, Y, bias, scaling, backend, mixed, index, base_sigma, base_bias, check_range):
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None:
        # Behave like nn.Linear under autocast: compute in the autocast dtype, whatever
        # dtypes x and the weights came in (so cast before the dtype checks). sigma, X, Y
        # feed the r x r core in their own dtype.
        x, U, V, bias, base_bias = (t.to(autocast_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                    else t for t in (x, U, V, bias, base_bias))
    if mixed:
        validate_multi_args(x, U, V, sigma, X, Y, bias, scaling, backend, index, base_sigma, base_bias,
                            check_range=check_range)
    else:
        validate_salt_args(x, U, V, sigma, X, Y, bias, scaling, backend)
    if autocast_dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return _run(x, U, V, sigma, X, Y, bias, float(scaling), backend, mixed, index, base_sigma, base_bias)
    return _run(x, U, V, sigma, X, Y, bias, float(scaling), backend, mixed, index, base_sigma, base_bias)


def _autocast_dtype(x):
    """The dtype autocast computes x's layer in, or None (autocast off; float64 x, which
    autocast leaves alone; an x that validation will reject)."""
    if not autocast_may_be_on() or not isinstance(x, torch.Tensor) or not x.is_floating_point() \
            or x.dtype == torch.float64:
        return None
    device_type = x.device.type
    if autocast_active(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _run(x, U, V, sigma, X, Y, bias, scaling, backend, mixed, index, base_sigma, base_bias):
    device_type = x.device.type
    if mixed:  # (the M rows of the policy were measured on plain calls)
        need = dispatch.call_need(mixed, x, U, V, (sigma, X, Y, bias, base_sigma, base_bias))
        row, dtype = dispatch._policy_row(device_type), x.dtype
    else:
        need = dispatch.PLAIN
        row, dtype = (dispatch._policy_row(device_type, x=x) if backend == "auto" else 0), None
    name = dispatch._pick(dispatch._candidates(backend, device_type, row, need, dtype), backend, U.shape[1])
    impl = dispatch.implementation(name, need)
    flat = x.dim() == 2
    x2d = x if flat else x.reshape(-1, x.shape[-1])
    if mixed:
        y2d = impl(x2d, U, V, sigma, X, Y, bias, index.reshape(-1), base_sigma, base_bias, scaling)
    else:
        y2d = impl(x2d, U, V, sigma, X, Y, bias, scaling)
    return y2d if flat else y2d.reshape(*x.shape[:-1], U.shape[0])
