"""Input validation for :func:`salt_kernels.salt_linear`, done once before any backend.

Every error names the argument, what was received and what was expected, so that a
bad call never reaches a kernel (where it could crash the process or read out of
bounds) and never returns a silently wrong answer.
"""

from __future__ import annotations

import numbers
import sys

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    return t


def _check_shape(name: str, t: torch.Tensor, expected: tuple, meaning: str) -> None:
    if t.shape != expected:  # (torch.Size compares equal to a tuple of the same ints)
        raise ValueError(
            f"{name}: expected shape {tuple(expected)} {meaning}, got {tuple(t.shape)}"
        )


_FLOAT_SET = frozenset(FLOAT_DTYPES)
_BACKEND_SET = frozenset(BACKENDS)
_FINITE_MAX = sys.float_info.max


def _valid_at_a_glance(x, U, V, sigma, X, Y, bias, scaling, backend) -> bool:
    """True only if every check of :func:`validate_salt_args` passes, tested in one pass
    without building messages (each layer call runs this; the detailed checks run only when
    it says False, to name what is wrong). A SymFloat scaling (torch.compile, dynamic) takes
    the detailed path, which turns its finiteness into a guard."""
    T = torch.Tensor
    if not (type(backend) is str and backend in _BACKEND_SET and type(scaling) is float
            and abs(scaling) <= _FINITE_MAX and isinstance(x, T) and isinstance(U, T) and isinstance(V, T)
            and isinstance(sigma, T) and isinstance(X, T) and isinstance(Y, T)):
        return False
    dtype, floats = x.dtype, _FLOAT_SET
    if not (dtype in floats and U.dtype == dtype and V.dtype == dtype and sigma.dtype in floats
            and X.dtype in floats and Y.dtype in floats and x.dim() > 0 and U.dim() == 2 and V.dim() == 2
            and sigma.dim() == 1 and X.dim() == 2 and Y.dim() == 2):
        return False
    (D, r), (K, r_v), (r_x, r_lora), (r_y, r_y2) = U.shape, V.shape, X.shape, Y.shape
    if not (r >= 1 and r_v == r and sigma.shape[0] == r and r_x == r and r_lora <= r and r_y == r_lora
            and r_y2 == r and x.shape[-1] == K):
        return False
    device = x.device
    if not (U.device == device and V.device == device and sigma.device == device and X.device == device
            and Y.device == device):
        return False
    return bias is None or (isinstance(bias, T) and bias.dtype == dtype and bias.dim() == 1 and bias.shape[0] == D
                            and bias.device == device)


def validate_salt_args(x, U, V, sigma, X, Y, bias, scaling, backend) -> None:
    """Raise ``TypeError``/``ValueError`` unless the arguments describe a valid SALT layer.

    Shapes: ``x (..., K)``, ``U (D, r)``, ``V (K, r)``, ``sigma (r,)``, ``X (r, r')``,
    ``Y (r', r)``, ``bias (D,)`` or None; ``r >= 1``, ``r' >= 0``.
    """
    if not torch.compiler.is_compiling() and _valid_at_a_glance(x, U, V, sigma, X, Y, bias, scaling, backend):
        return
    # The checks one by one, each naming what is wrong (and, under torch.compile, the
    # checks Dynamo turns into guards).
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if type(scaling) is not float and (isinstance(scaling, torch.Tensor) or not isinstance(scaling, numbers.Real)
                                      or isinstance(scaling, bool)):
        raise TypeError(f"scaling: expected a Python float, got {type(scaling).__name__}")
    # Written as a comparison rather than math.isfinite so that under torch.compile with
    # dynamic=True (where scaling is a symbolic float) it becomes a guard on the value
    # instead of a graph break: a later non-finite scaling fails the guard, is traced
    # afresh and raises here. NaN fails every comparison.
    if not abs(scaling) <= sys.float_info.max:
        raise ValueError(f"scaling: expected a finite number, got {scaling}")

    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension (..., in_features), got a 0-d tensor")
    _check_tensor("U", U, 2)
    _check_tensor("V", V, 2)
    D, r = U.shape
    K = V.shape[0]
    if r < 1:
        raise ValueError(f"U: expected shape (out_features, rank) with rank >= 1, got {tuple(U.shape)}")
    _check_shape("V", V, (K, r), "= (in_features, rank) with rank from U")
    _check_tensor("sigma", sigma, 1)
    _check_shape("sigma", sigma, (r,), "= (rank,)")
    _check_tensor("X", X, 2)
    if X.shape[0] != r:
        raise ValueError(f"X: expected shape ({r}, lora_rank) = (rank, lora_rank), got {tuple(X.shape)}")
    r_lora = X.shape[1]
    if r_lora > r:
        raise ValueError(f"X: expected lora_rank <= rank = {r}, got shape {tuple(X.shape)}")
    _check_tensor("Y", Y, 2)
    _check_shape("Y", Y, (r_lora, r), "= (lora_rank, rank)")
    if x.shape[-1] != K:
        raise ValueError(
            f"x: expected last dimension {K} (in_features, from V of shape {tuple(V.shape)}), "
            f"got shape {tuple(x.shape)}"
        )
    if bias is not None:
        _check_tensor("bias", bias, 1)
        _check_shape("bias", bias, (D,), "= (out_features,)")

    device, dtype = x.device, x.dtype
    for name, t in (("U", U), ("V", V), ("sigma", sigma), ("X", X), ("Y", Y), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on x's device {device}, got {t.device}")
    # The frozen basis and bias are streamed by the kernels next to x, so they share
    # its dtype (as nn.Linear's weight must). sigma, X, Y only feed the tiny r x r core
    # and may be kept in a wider dtype (fp32 master parameters for a bf16 model).
    for name, t in (("U", U), ("V", V), ("bias", bias)):
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (x's dtype), got {t.dtype}")
