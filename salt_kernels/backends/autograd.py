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

from .core import accumulate_dtype, autocast_off, mix_matrix


def register_salt_autograd(forward_op, backward_op) -> None:
    """Register autograd for ``forward_op`` using ``backward_op`` (contract above)."""

    def setup_context(ctx, inputs, output):
        x, U, V, C, bias = inputs
        _, Z = output
        # Save x only if dV is needed: otherwise Z (M x r) is all the backward reads.
        ctx.save_for_backward(Z, U, V, C, x if V.requires_grad else None)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_y, grad_Z):
        with autocast_off(grad_y.device.type):
            return _backward(ctx, grad_y)

    def _backward(ctx, grad_y):
        # (grad_Z is always zero: Z is an internal output that salt_linear never returns.)
        Z, U, V, C, x = ctx.saved_tensors
        need_x, need_U, need_V, need_C, need_b = ctx.needs_input_grad
        need_b = need_b and ctx.has_bias
        dx, dC, db = backward_op(grad_y, Z, U, V, C, need_x, need_C, need_b)
        dU = dV = None
        if need_U or need_V:
            acc = C.dtype
            G = grad_y.to(acc)
            if need_U:
                dU = (G.t() @ (Z @ C.t())).to(U.dtype)  # dU = G^T T
            if need_V:
                dV = (x.to(acc).t() @ ((G @ U.to(acc)) @ C)).to(V.dtype)  # dV = x^T dZ
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
