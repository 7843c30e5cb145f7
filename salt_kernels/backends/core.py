"""Math shared by every backend: the r x r core matrix C = diag(sigma) + s * X @ Y.

Kernel backends take C, not (sigma, X, Y): C is tiny, so building it with plain torch
ops costs one small launch, and autograd then turns the kernel's dC into dsigma, dX
and dY (docs/design.md, "Gradients") without any backend re-deriving that chain rule.
"""

from __future__ import annotations

import contextlib

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _diag_and_factors(sigma, X, Y, dtype: torch.dtype):
    """diag(sigma), X and Y in ``dtype``. Casts to the dtype already held are skipped: each
    is a dispatch, and at decode this tiny product is a visible share of a layer call."""
    C = torch.diag(sigma if sigma.dtype == dtype else sigma.to(dtype))
    return C, (X if X.dtype == dtype else X.to(dtype)), (Y if Y.dtype == dtype else Y.to(dtype))


def mix_matrix(sigma, X, Y, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """C = diag(sigma) + scaling * X @ Y, shape (r, r), in ``dtype``."""
    C, X, Y = _diag_and_factors(sigma, X, Y, dtype)
    if X.shape[1] == 0:
        return C
    if torch.compiler.is_compiling():
        # scaling multiplies the small factor X (r x r') rather than riding as addmm's
        # alpha: under torch.compile a symbolic alpha is specialised by addmm's backward.
        return torch.addmm(C, X * scaling, Y)
    return torch.addmm(C, X, Y, alpha=scaling)  # (alpha saves a launch: a scalar times X is one more op)


def mix_matrix_untracked(sigma, X, Y, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`mix_matrix` for eager code that autograd does not record (an autograd
    Function's forward, calls without gradients): the product is added into the diagonal
    matrix in place, which saves an allocation and a copy of C on every layer call."""
    C, X, Y = _diag_and_factors(sigma, X, Y, dtype)
    if X.shape[1] > 0:
        if scaling == 1.0:  # (alpha parsed from Python costs as much as the product at decode sizes)
            C.addmm_(X, Y)
        else:
            C.addmm_(X, Y, alpha=scaling)
    return C


def constant_for_compile(fn):
    """``torch.compiler.assume_constant_result`` without importing Dynamo at import time.
    That decorator only marks ``fn`` (Dynamo reads the mark when it traces a call), but
    calling it imports ``torch._dynamo``, which was most of the cost of
    ``import salt_kernels``. tests/test_import.py checks that the mark is the one torch's
    decorator sets."""
    fn._dynamo_marked_constant = True
    return fn


_AUTOCAST_AVAILABLE: dict = {}


@constant_for_compile
def _autocast_available(device_type: str) -> bool:
    # A constant for torch.compile: the Dynamo of torch 2.11 cannot trace
    # torch.amp.is_autocast_available (a graph break, fatal under fullgraph=True).
    # Cached: it is asked on every layer call.
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return available


# One flag for "autocast is on for some device": a layer call asks it first, since autocast
# is off in most calls and the per-device query costs several times as much.
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_may_be_on() -> bool:
    """False only when no autocast region is on for any device (then no per-device query is
    needed); always True while torch.compile traces."""
    return _any_autocast_enabled is None or torch.compiler.is_compiling() or _any_autocast_enabled()


def autocast_active(device_type: str) -> bool:
    """Whether a torch.autocast region is active for ``device_type`` (False for device
    types without autocast)."""
    # (while tracing, the per-device query is the one Dynamo knows)
    return autocast_may_be_on() and _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """A context turning autocast off on ``device_type`` if it is on (else a no-op): a
    backward called inside a torch.autocast block must not re-cast the operands of a
    forward that ran with autocast off (salt_linear casts first)."""
    if autocast_active(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


def autocast_off_for(t: torch.Tensor):
    """:func:`autocast_off` for ``t``'s device; the device is looked up only while some
    autocast region is on."""
    return autocast_off(t.device.type) if autocast_may_be_on() else _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()  # (reusable: it holds no state)

