"""The ``reference`` backend: the straightforward PyTorch autograd chain.

    z = x @ V            (M, r)
    t = z * sigma + s * (z @ Y^T) @ X^T
    y = t @ U^T + b      (bias fused through addmm: no extra M x D temporary)

Works on every device and dtype; it is the last fallback and what the kernels are
benchmarked against. Its autograd saves x (M x K), unlike the kernel backends which
save z (M x r).
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
