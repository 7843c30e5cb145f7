"""Mixed-adapter batches: :func:`salt_kernels.salt_linear` with ``adapter_index``.

Every SALT adapter of one base shares ``U``, ``V``; an adapter is only its core
``C_a = diag(sigma_a) + s X_a Y_a``. A batch whose row ``m`` uses adapter
``a = adapter_index[m]`` costs one shared shrink GEMM, a per-row mix and one shared
expand GEMM (docs/design.md, "Many adapters on one base")::

    Z = x V;   T[m] = Z[m] * sigma_a + s (Z[m] Y_a^T) X_a^T;   y = T U^T + b_a

Arguments (validated here, before any backend runs):

* ``sigma (A, r)``, ``X (A, r, r')``, ``Y (A, r', r)``: the bank of ``A >= 1`` adapters.
* ``bias``: ``(D,)`` shared by every row, ``(A, D)`` one per adapter, or None.
* ``adapter_index``: int64 on x's device, shape ``x.shape[:-1]`` or ``(M,)`` with ``M``
  the number of rows of x's flattened leading dims; values in ``[0, A)``, or ``-1`` for
  the base layer.
* ``base_sigma (r,)``: the core of ``-1`` rows, ``diag(base_sigma)`` with no ``X Y``
  term (for a converted layer: its ``sigma0``, the pretrained singular values). Required
  when any row is ``-1``.
* ``base_bias (D,)``: the bias of ``-1`` rows when ``bias`` is banked ``(A, D)`` (None:
  no bias on those rows). With a shared ``(D,)`` bias every row, ``-1`` included, uses it.

The range of ``adapter_index`` is checked on every call: free on CPU, one device-to-host
synchronisation on CUDA (the forwards themselves read nothing on the host; the C++
backward reads the adapter segments there). ``check_range=False`` skips it (the
model-level :func:`salt_kernels.adapters` block does, its index is built from checked
names). Inside ``torch.compile`` and during CUDA-graph capture the check is a device-side
assert instead.

Backends: ``reference`` gathers each row's core (plain PyTorch, autograd); ``cpu`` and
``cuda`` run the compiled ``salt_multi_forward`` / ``salt_multi_backward`` (rows
segmented by adapter internally); ``triton`` fuses the gathered mix into the expand
kernel (forward; calls that need gradients run on the C++ op). A basis ``U`` / ``V`` that requires grad runs on ``reference`` (the kernels
assume a frozen basis, as every SALT layer has).
"""

from __future__ import annotations

import importlib
import warnings

import torch

from . import dispatch
from ._validate import _check_shape, _check_tensor, validate_salt_args
from .backends.core import accumulate_dtype, autocast_active

# backend -> module with ``multi_linear_2d`` (imported lazily: optional pieces may be absent)
_MULTI_MODULES = {
    "reference": "salt_kernels.multi_adapter",
    "cpu": "salt_kernels.backends.multi_extension",
    "cuda": "salt_kernels.backends.multi_extension",
    "triton": "salt_kernels.backends.triton_multi",
}
_resolved: dict[tuple[str, str], tuple] = {}  # (backend, device type) -> candidates
_impls: dict = {}  # backend name -> its multi_linear_2d
_warned: set[str] = set()


# --------------------------------------------------------------------------- validation


def validate_multi_args(x, U, V, sigma, X, Y, bias, scaling, backend, adapter_index, base_sigma,
                        base_bias, *, check_range: bool = True) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless the arguments describe a valid bank
    and index (module docstring); every error names the argument."""
    _check_tensor("sigma", sigma)
    if sigma.dim() != 2 or sigma.shape[0] < 1:
        raise ValueError(f"sigma: with adapter_index, expected a bank of shape (num_adapters, rank) with "
                         f"num_adapters >= 1, got shape {tuple(sigma.shape)}")
    A = sigma.shape[0]
    for name, t in (("X", X), ("Y", Y)):
        _check_tensor(name, t)
        if t.dim() != 3 or t.shape[0] != A:
            what = "(num_adapters, rank, lora_rank)" if name == "X" else "(num_adapters, lora_rank, rank)"
            raise ValueError(f"{name}: with adapter_index, expected shape {what} with num_adapters = {A} "
                             f"(from sigma), got {tuple(t.shape)}")
    banked_bias = bias is not None and isinstance(bias, torch.Tensor) and bias.dim() == 2
    if banked_bias:
        _check_tensor("bias", bias)
        _check_shape("bias", bias, (A, U.shape[0] if U.dim() == 2 else -1),
                     "= (num_adapters, out_features) or (out_features,)")
    # Everything per adapter is now one slice of the bank: the single-adapter checks
    # cover x, U, V, the slices' shapes, dtypes and devices.
    validate_salt_args(x, U, V, sigma[0], X[0], Y[0], bias[0] if banked_bias else bias, scaling, backend)
    D, r = U.shape
    if base_sigma is not None:
        _check_tensor("base_sigma", base_sigma, 1)
        _check_shape("base_sigma", base_sigma, (r,), "= (rank,)")
        if base_sigma.device != x.device:
            raise ValueError(f"base_sigma: expected a tensor on x's device {x.device}, got {base_sigma.device}")
    if base_bias is not None:
        if not banked_bias:
            raise ValueError("base_bias: only meaningful with a per-adapter bias of shape (num_adapters, "
                             "out_features); a shared bias (out_features,) already applies to base rows")
        _check_tensor("base_bias", base_bias, 1)
        _check_shape("base_bias", base_bias, (D,), "= (out_features,)")
        if base_bias.device != x.device or base_bias.dtype != x.dtype:
            raise TypeError(f"base_bias: expected a {x.dtype} tensor on {x.device} (x's), got "
                            f"{base_bias.dtype} on {base_bias.device}")
    check_adapter_index(adapter_index, x, A, base_sigma is not None, check_range=check_range)


def _capturing(x) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_adapter_index(adapter_index, x, num_adapters: int, allow_base: bool, *, check_range: bool = True) -> None:
    """Type, dtype, device, shape and (``check_range``) value range of ``adapter_index``."""
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index: expected an int64 torch.Tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype != torch.int64:
        raise TypeError(f"adapter_index: expected dtype torch.int64, got {adapter_index.dtype}")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index: expected a tensor on x's device {x.device}, got {adapter_index.device}")
    lead = tuple(x.shape[:-1])
    M = x.numel() // x.shape[-1] if x.shape[-1] else int(torch.Size(lead).numel())
    if tuple(adapter_index.shape) not in (lead, (M,)):
        raise ValueError(f"adapter_index: expected one index per row of x, shape {lead} or ({M},), "
                         f"got {tuple(adapter_index.shape)}")
    if not check_range or adapter_index.numel() == 0:
        return
    low = -1 if allow_base else 0
    if torch.compiler.is_compiling() or _capturing(x):
        # Traced, or a CUDA graph being captured: no host read of the values (it would break
        # the graph, or fail the capture); the check runs on the device (a CUDA device
        # assert, a RuntimeError on CPU).
        torch._assert_async(((adapter_index >= low) & (adapter_index < num_adapters)).all(),
                            f"adapter_index: expected values in [{low}, {num_adapters})")
        return
    lo, hi = (int(v) for v in torch.aminmax(adapter_index))  # one host sync on CUDA
    if lo < low or hi >= num_adapters:
        bad = lo if lo < low else hi
        base = "" if allow_base else " (-1, the base layer, needs base_sigma)"
        raise ValueError(f"adapter_index: expected values in [{low}, {num_adapters}) for {num_adapters} "
                         f"adapters{base}, got {bad}")


# --------------------------------------------------------------------------- the op


def salt_linear_multi(x, U, V, sigma, X, Y, bias=None, *, scaling: float = 1.0, backend: str = "auto",
                      adapter_index, base_sigma=None, base_bias=None, check_range: bool = True):
    """:func:`salt_kernels.salt_linear` with ``adapter_index`` (module docstring)."""
    validate_multi_args(x, U, V, sigma, X, Y, bias, scaling, backend, adapter_index, base_sigma, base_bias,
                        check_range=check_range)
    device_type = x.device.type
    if autocast_active(device_type) and x.dtype != torch.float64:
        # As salt_linear: compute in the autocast dtype, as nn.Linear would.
        dtype = torch.get_autocast_dtype(device_type)
        x, U, V = x.to(dtype), U.to(dtype), V.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        base_bias = None if base_bias is None else base_bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _run(x, U, V, sigma, X, Y, bias, adapter_index, base_sigma, base_bias, float(scaling), backend)
    return _run(x, U, V, sigma, X, Y, bias, adapter_index, base_sigma, base_bias, float(scaling), backend)


def _run(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling, backend):
    trainable_basis = torch.is_grad_enabled() and (U.requires_grad or V.requires_grad)
    impl = multi_linear_2d if trainable_basis else resolve_multi_impl(backend, x.device.type, U.shape[1])
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = impl(x2d, U, V, sigma, X, Y, bias, index.reshape(-1), base_sigma, base_bias, scaling)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], U.shape[0])


def _multi_module(name: str):
    try:
        return importlib.import_module(_MULTI_MODULES[name]), None
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _resolve(backend: str, device_type: str, rank):
    """(name, multi_linear_2d) of the backend that runs mixed-adapter calls. As in
    :mod:`salt_kernels.dispatch`: the candidates are a cached constant for torch.compile,
    and the rank is compared with their limits in traced code."""
    name = dispatch._pick(_multi_candidates(backend, device_type), backend, rank)
    return name, _impls[name]


@torch.compiler.assume_constant_result
def _multi_candidates(backend: str, device_type: str) -> tuple:
    key = (backend, device_type)
    if key not in _resolved:
        _resolved[key] = _multi_candidates_uncached(backend, device_type)
    return _resolved[key]


def _multi_candidates_uncached(backend: str, device_type: str) -> tuple:
    """((name, rank limit or None), ...): the backends with mixed-adapter kernels to try."""
    if backend != "auto":
        dispatch.resolve_backend(backend, device_type)  # raises if unavailable
        mod, err = _multi_module(backend)
        if mod is None:
            raise dispatch.BackendUnavailableError(
                f"backend='{backend}' has no mixed-adapter kernels ({err}); rebuild the extension or use "
                "backend='auto'")
        _impls[backend] = mod.multi_linear_2d
        return ((backend, dispatch._max_rank(backend)),)
    order = dispatch.auto_order(device_type)
    out = []
    for name in order:
        if dispatch.unavailable_reason(name, device_type) is not None:
            continue  # (salt_linear warns about missing pieces of the plain op)
        mod, err = _multi_module(name)
        if mod is not None:
            _impls[name] = mod.multi_linear_2d
            out.append((name, dispatch._max_rank(name)))
        elif err not in _warned:
            _warned.add(err)
            warnings.warn(f"salt_kernels: backend '{name}' has no mixed-adapter kernels ({err}); falling "
                          f"back to the next of {order}.", RuntimeWarning, stacklevel=7)
    if all(name != "reference" for name, _ in out):
        _impls["reference"] = multi_linear_2d
        out.append(("reference", None))
    return tuple(out)


def resolve_multi_backend(backend: str, device, rank: int = 1) -> str:
    """The backend that runs mixed-adapter calls of ``backend`` on ``device`` at rank ``rank``."""
    return _resolve(backend, torch.device(device).type, rank)[0]


def resolve_multi_impl(backend: str, device_type: str, rank: int):
    return _resolve(backend, device_type, rank)[1]


# --------------------------------------------------------------------------- reference


def availability(device: torch.device, backend: str) -> str | None:
    return None


def multi_linear_2d(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling: float):
    """The ``reference`` backend: gather each row's core (plain PyTorch autograd)."""
    z = x @ V
    A = sigma.shape[0]
    if base_sigma is not None:  # the base layer as adapter A, with X = Y = 0
        sigma = torch.cat([sigma, base_sigma.to(sigma.dtype)[None]])
        X = torch.cat([X, X.new_zeros(1, *X.shape[1:])])
        Y = torch.cat([Y, Y.new_zeros(1, *Y.shape[1:])])
        index = torch.where(index < 0, A, index)
    t = z * sigma.to(z.dtype)[index]
    if X.shape[2] > 0:
        u = torch.einsum("mr,mkr->mk", z, Y.to(z.dtype)[index])  # Z[m] Y_a^T
        t = t + scaling * torch.einsum("mk,mrk->mr", u, X.to(z.dtype)[index])  # ... X_a^T
    y = t @ U.t()
    if bias is None:
        return y
    if bias.dim() == 1:
        return y + bias
    rows = torch.cat([bias, (bias.new_zeros(1, bias.shape[1]) if base_bias is None else base_bias[None])])
    return y + rows[index]  # (-1 rows were remapped to A above, or there are none)
