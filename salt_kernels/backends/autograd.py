"""Autograd shared by the kernel backends (Triton, C++/CUDA extension).

A kernel backend provides two custom ops (``torch.library``) with this contract:

    forward(x (M,K), U (D,r), V (K,r), C (r,r), bias (D,) | None) -> (y (M,D), Z (M,r))
        y in x's dtype, Z = x @ V in C's dtype (fp32; fp64 for fp64 x), saved for backward.
    backward(G (M,D), Z (M,r), U, V, C, need_dx, need_dC, need_db) -> (dx (M,K), dC (r,r), db (D,))
        dT = G U, dC = dT^T Z, dZ = dT C, dx = dZ V^T, db = sum_rows G (docs/design.md, "Gradients");
        an output not asked for is returned as an empty tensor. dC in C's dtype, dx and
        db in x's dtype. The reductions over M (dC, db) are deterministic.

Inputs may have any strides (G from ``y.sum()`` has stride 0). This module registers
autograd for such a pair once, so no backend writes the chain rule again: C carries
sigma, X and Y (see :mod:`.core`), and the rare gradients for the frozen basis
(dU = G^T T, dV = x^T dZ) are computed here with plain torch ops, from x saved only
when V requires grad.
"""

from __future__ import annotations

import torch

from .core import accumulate_dtype, autocast_off_for, mix_matrix, mix_matrix_untracked


def register_salt_autograd(forward_op, backward_op) -> None:
    """Register autograd for ``forward_op`` using ``backward_op`` (contract above)."""

    def setup_context(ctx, inputs, output):
        x, U, V, C, bias = inputs
        _, Z = output
        # Save x only if dV is needed: otherwise Z (M x r) is all the backward reads.
        ctx.save_for_backward(Z, U, V, C, x if V.requires_grad else None)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_y, grad_Z):
        with autocast_off_for(grad_y):
            return _backward(ctx, grad_y)

    def _backward(ctx, grad_y):
        # (grad_Z is always zero: Z is an internal output that salt_linear never returns.)
        Z, U, V, C, x = ctx.saved_tensors
        need_x, need_U, need_V, need_C, need_b = ctx.needs_input_grad
        need_b = need_b and ctx.has_bias
        dx, dC, db = backward_op(grad_y, Z, U, V, C, need_x, need_C, need_b)
        dU, dV = _basis_grads(grad_y, Z, U, V, C, x, need_U, need_V)
        return (
            dx if need_x else None,
            dU,
            dV,
            dC if need_C else None,
            db if need_b else None,
        )

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def run_salt_op(forward_op, x, U, V, sigma, X, Y, bias, scaling: float):
    """``salt_linear_2d`` for a kernel backend: build C, run the op, drop Z."""
    C = mix_matrix(sigma, X, Y, scaling, accumulate_dtype(x.dtype))
    y, _ = forward_op(x, U, V, C, bias)
    return y


def eager_function(forward_body, backward_body) -> type:
    """The eager path of a kernel backend (see :func:`run_salt_eager`): one autograd
    Function for the whole layer over the backend's op bodies (the contract above), the
    core C built inside it. Its backward runs the backward body and turns dC into dsigma,
    dX, dY directly (C = diag(sigma) + s X Y): dsigma = diag(dC), dX = s dC Y^T,
    dY = s X^T dC."""

    class EagerSalt(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, U, V, sigma, X, Y, bias, scaling):
            C = mix_matrix_untracked(sigma, X, Y, scaling, accumulate_dtype(x.dtype))  # (autograd is off here)
            y, Z = forward_body(x, U, V, C, bias)
            # (X only for dY, Y only for dX, x only for dV)
            ctx.save_for_backward(Z, U, V, C, X if Y.requires_grad else None, Y if X.requires_grad else None,
                                  x if V.requires_grad else None)
            ctx.scaling, ctx.has_bias, ctx.dtypes = scaling, bias is not None, (sigma.dtype, X.dtype, Y.dtype)
            return y

        @staticmethod
        def backward(ctx, grad_y):
            with autocast_off_for(grad_y):
                Z, U, V, C, X, Y, x = ctx.saved_tensors
                need_x, need_U, need_V, need_sigma, need_X, need_Y, need_b, _ = ctx.needs_input_grad
                need_b = need_b and ctx.has_bias
                dx, dC, db = backward_body(grad_y, Z, U, V, C, need_x, need_sigma or need_X or need_Y, need_b)
                dU, dV = _basis_grads(grad_y, Z, U, V, C, x, need_U, need_V) if need_U or need_V else (None, None)
                sigma_t, X_t, Y_t = ctx.dtypes
                dsigma = dX = dY = None
                if need_sigma:
                    dsigma = dC.diagonal()
                    dsigma = dsigma if dsigma.dtype == sigma_t else dsigma.to(sigma_t)
                if need_X or need_Y:
                    acc = C.dtype
                    sdC = dC if ctx.scaling == 1.0 else dC * ctx.scaling
                    if need_X:  # dX = s dC Y^T (linear: the transpose inside the GEMM, not a view op)
                        dX = torch.nn.functional.linear(sdC, Y if Y.dtype == acc else Y.to(acc))
                        dX = dX if dX.dtype == X_t else dX.to(X_t)
                    if need_Y:
                        dY = torch.mm((X if X.dtype == acc else X.to(acc)).t(), sdC)
                        dY = dY if dY.dtype == Y_t else dY.to(Y_t)
            return dx if need_x else None, dU, dV, dsigma, dX, dY, db if need_b else None, None

    return EagerSalt


def _basis_grads(grad_y, Z, U, V, C, x, need_U: bool, need_V: bool):
    """dU = G^T T and dV = x^T dZ (frozen in SALT; plain torch ops when asked for)."""
    dU = dV = None
    if need_U or need_V:
        acc = C.dtype
        G = grad_y.to(acc)
        if need_U:
            dU = (G.t() @ (Z @ C.t())).to(U.dtype)  # dU = G^T T
        if need_V:
            dV = (x.to(acc).t() @ ((G @ U.to(acc)) @ C)).to(V.dtype)  # dV = x^T dZ
    return dU, dV


def run_salt_eager(function, forward_body, x, U, V, sigma, X, Y, bias, scaling: float):
    """``salt_linear_2d`` of a kernel backend outside tracing: the bodies of its op pair
    (the contract above) without the custom-op dispatch, whose fixed cost per call (tens
    of microseconds) is most of a decode step. Without autograd, the forward body alone;
    otherwise one node of ``function`` (:func:`eager_function` over the same bodies)."""
    if not torch.is_grad_enabled() or not (x.requires_grad or U.requires_grad or V.requires_grad
                                           or sigma.requires_grad or X.requires_grad or Y.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        C = mix_matrix_untracked(sigma, X, Y, scaling, accumulate_dtype(x.dtype))  # (nothing to record)
        return forward_body(x, U, V, C, bias)[0]
    return function.apply(x, U, V, sigma, X, Y, bias, scaling)
