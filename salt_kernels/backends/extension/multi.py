"""The ``cpu`` and ``cuda`` backends of mixed-adapter :func:`salt_kernels.salt_linear`:
the compiled ops ``salt_kernels::salt_multi_forward`` / ``salt_multi_backward``
(``csrc/salt_multi.cpp``, one implementation registered for CPU and CUDA), plus
what torch needs around them: fake kernels and autograd.

Contract::

    forward(x (M,K), U (D,r), V (K,r), sigma (A,r), X (A,r,r'), Y (A,r',r), bias (D,)|(A,D)|None,
            adapter_index int64 (M,), base_sigma (r,)|None, base_bias (D,)|None, scaling)
        -> (y (M,D) in x's dtype, Z = x V (M,r) in sigma's dtype, saved for backward)
    backward(G, Z, U, V, sigma, X, Y, adapter_index, base_sigma, scaling, bias_kind,
             need_dx, need_dcore, need_db)
        -> (dx (M,K), dsigma (A+1,r), dX (A,r,r'), dY (A,r',r), db (D,) | (A+1,D))

Row ``A`` of dsigma / a banked db belongs to base_sigma / base_bias. sigma, X, Y (and
base_sigma) are passed in the accumulation dtype (fp32; fp64 for fp64 x): autograd
casts their gradients back to the parameters' dtype.

Importing this module raises ImportError when the extension is missing or was built
without these ops; the backend then declares no mixed forward and
:mod:`salt_kernels.ops.dispatch` falls back with one warning.
"""

from __future__ import annotations

import torch

from ..core import accumulate_dtype, autocast_off
from .ops import _check_one_device

try:
    from ... import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:
    raise ImportError(f"the compiled extension salt_kernels._C is not available ({exc})") from exc
if not hasattr(torch.ops.salt_kernels, "salt_multi_forward"):
    raise ImportError("salt_kernels._C was built without the mixed-adapter ops (csrc/salt_multi.cpp); "
                      "rebuild with `pip install --no-build-isolation -e .`")

FORWARD_OP = "salt_kernels::salt_multi_forward"
BACKWARD_OP = "salt_kernels::salt_multi_backward"
multi_forward = torch.ops.salt_kernels.salt_multi_forward.default
multi_backward = torch.ops.salt_kernels.salt_multi_backward.default


@torch.library.register_fake(FORWARD_OP)
def _forward_fake(x, U, V, sigma, X, Y, bias, adapter_index, base_sigma, base_bias, scaling):
    _check_one_device("salt_multi_forward", x=x, U=U, V=V, sigma=sigma, X=X, Y=Y, adapter_index=adapter_index,
                      base_sigma=base_sigma, bias=bias, base_bias=base_bias)
    M = x.shape[0]
    return x.new_empty(M, U.shape[0]), x.new_empty(M, V.shape[1], dtype=sigma.dtype)


@torch.library.register_fake(BACKWARD_OP)
def _backward_fake(G, Z, U, V, sigma, X, Y, adapter_index, base_sigma, scaling, bias_kind, need_dx,
                   need_dcore, need_db):
    _check_one_device("salt_multi_backward", G=G, U=U, V=V, sigma=sigma, X=X, Y=Y, adapter_index=adapter_index,
                      base_sigma=base_sigma, Z=Z)
    M, D = G.shape
    A, r = sigma.shape
    empty_acc = sigma.new_empty(0)
    db = G.new_empty(0)
    if need_db and bias_kind == 1:
        db = G.new_empty(D)
    elif need_db and bias_kind == 2:
        db = G.new_empty(A + 1, D)
    return (G.new_empty(M, V.shape[0]) if need_dx else G.new_empty(0),
            sigma.new_empty(A + 1, r) if need_dcore else empty_acc,
            X.new_empty(X.shape) if need_dcore else empty_acc,
            Y.new_empty(Y.shape) if need_dcore else empty_acc,
            db)


def _setup_context(ctx, inputs, output):
    x, U, V, sigma, X, Y, bias, adapter_index, base_sigma, base_bias, scaling = inputs
    ctx.save_for_backward(output[1], U, V, sigma, X, Y, adapter_index, base_sigma)
    ctx.scaling = scaling
    ctx.bias_kind = 0 if bias is None else bias.dim()  # 1 shared, 2 banked


def _backward(ctx, grad_y, grad_Z):
    with autocast_off(grad_y.device.type):
        return _backward_impl(ctx, grad_y)


def _backward_impl(ctx, grad_y):
    Z, U, V, sigma, X, Y, index, base_sigma = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_core = need[0], need[3] or need[4] or need[5] or need[8]
    need_b = need[6] or need[9]
    if need[1] or need[2]:
        raise RuntimeError("salt_kernels: the mixed-adapter kernels assume a frozen U and V; "
                           "salt_linear runs a trainable basis on the reference backend")
    dx, dsigma, dX, dY, db = multi_backward(grad_y, Z, U, V, sigma, X, Y, index, base_sigma, ctx.scaling,
                                            ctx.bias_kind, need_x, need_core, need_b)
    A = sigma.shape[0]
    banked = ctx.bias_kind == 2 and need_b
    return (dx if need_x else None, None, None,
            dsigma[:A] if need[3] else None, dX if need[4] else None, dY if need[5] else None,
            (db[:A] if banked else db) if need[6] else None, None,
            dsigma[A] if need[8] else None,
            db[A] if banked and need[9] else None, None)


torch.library.register_autograd(FORWARD_OP, _backward, setup_context=_setup_context)


def multi_linear_2d(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling: float):
    acc = accumulate_dtype(x.dtype)
    base = None if base_sigma is None else base_sigma.to(acc)
    y, _ = multi_forward(x, U, V, sigma.to(acc), X.to(acc), Y.to(acc), bias, index, base, base_bias, scaling)
    return y
