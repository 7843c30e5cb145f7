"""The one place that chooses a backend for :func:`salt_linear`.

``backend="auto"`` picks, by the device of ``x``:

* CUDA: ``triton`` -> ``cuda`` -> ``reference``
* CPU:  ``cpu`` -> ``reference``

Optional pieces (Triton, the compiled extension) may be missing: ``auto`` then falls
back and warns once per reason. An explicitly requested backend that cannot run raises
:class:`BackendUnavailableError` saying why and how to get it.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from ._validate import validate_salt_args

# backend name -> module implementing it (imported lazily: optional pieces may be absent)
_BACKEND_MODULES = {
    "reference": "salt_kernels.backends.reference",
    "triton": "salt_kernels.backends.triton_kernels",
    "cuda": "salt_kernels.backends.extension",
    "cpu": "salt_kernels.backends.extension",
}

_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

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
    order = list(_AUTO_ORDER.get(device.type, ("reference",)))
    order += [b for b in _BACKEND_MODULES if b not in order]
    return [b for b in order if unavailable_reason(b, device) is None]


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend='{backend}' is not available: {reason}")
        return backend
    order = _AUTO_ORDER.get(device.type, ("reference",))
    for name in order:
        reason = unavailable_reason(name, device)
        if reason is None:
            return name
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(
                f"salt_kernels: skipping backend '{name}' on {device.type}: {reason}. "
                f"Falling back to the next of {order}.",
                RuntimeWarning,
                stacklevel=4,
            )
    return "reference"


def salt_linear(x, U, V, sigma, X, Y, bias=None, *, scaling: float = 1.0, backend: str = "auto"):
    """SALT linear layer: ``y = U @ ((diag(sigma) + scaling * X @ Y) @ (V^T @ x)) + bias``.

    Shapes: ``x (..., K)`` (including 1-D and empty batches), ``U (D, r)``, ``V (K, r)``,
    ``sigma (r,)``, ``X (r, r')``, ``Y (r', r)``, ``bias (D,)`` or None. Returns
    ``(..., D)`` in x's dtype (or the autocast dtype inside ``torch.autocast``).
    Differentiable in every tensor argument.
    """
    validate_salt_args(x, U, V, sigma, X, Y, bias, scaling, backend)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Behave like nn.Linear under autocast: compute in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        x, U, V = x.to(dtype), U.to(dtype), V.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _run(x, U, V, sigma, X, Y, bias, float(scaling), backend)
    return _run(x, U, V, sigma, X, Y, bias, float(scaling), backend)


@torch.compiler.assume_constant_result
def _resolve_for_run(backend: str, device: torch.device) -> str:
    # Runs eagerly even under torch.compile (importlib and warnings are not traceable);
    # the backend name is a constant of the compiled graph, guarded like any global.
    name = resolve_backend(backend, device)
    _loaded[name] = _module(name)[0]
    return name


_loaded: dict = {}


def _run(x, U, V, sigma, X, Y, bias, scaling, backend):
    name = _resolve_for_run(backend, x.device)
    mod = _loaded[name]
    lead = x.shape[:-1]
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y2d = mod.salt_linear_2d(x2d, U, V, sigma, X, Y, bias, scaling)
    return y2d if x.dim() == 2 else y2d.reshape(*lead, U.shape[0])
