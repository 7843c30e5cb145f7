"""The ``reference`` backend: the straightforward PyTorch autograd chain.

    z = x @ V            (M, r)
    t = z * sigma + s * (z @ Y^T) @ X^T
    y = t @ U^T + b      (bias fused through addmm: no extra M x D temporary)

Mixed-adapter batches gather each row's core instead (``multi_linear_2d``).

Works on every device and dtype and implements every call (plain and mixed, every
gradient, any rank): it is the last fallback and what the kernels are benchmarked
against. Its autograd saves x (M x K), unlike the kernel backends which save z (M x r).
"""

from __future__ import annotations

import torch


def availability(device: torch.device, backend: str) -> str | None:
    return None


def salt_linear_2d(x, U, V, sigma, X, Y, bias, scaling: float):
    z = x @ V
    t = z * sigma.to(z.dtype)
    if X.shape[1] > 0:
        # scaling on the small X (r x r'), not as alpha: see backends/core.py
        t = torch.addmm(t, z @ Y.t().to(z.dtype), X.t().to(z.dtype) * scaling)
    if bias is None:
        return t @ U.t()
    return torch.addmm(bias, t, U.t())


MULTI_BACKWARD = True
MULTI_BASIS_BACKWARD = True


def multi_linear_2d(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling: float):
    """Mixed batch: gather each row's core (plain PyTorch autograd)."""
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
