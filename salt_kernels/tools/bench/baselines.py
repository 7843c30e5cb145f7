"""The layers SALT is benchmarked against (docs/design.md, "Performance model").

* :func:`dense_linear` -- a plain ``nn.Linear`` of the same size (``F.linear``), trained
  in full: what the layer costs without any adapter.
* :func:`official_salt_forward` -- the way the official SALT code computes the layer,
  which is what users are leaving. Every forward it

  1. forms ``Σ' = ReLU(a ⊙ σ + b)`` over the *full* SVD spectrum (R = min(D, K) values):
     the trainable scale/shift ``a``, ``b`` cover the top ``r`` values and are
     concatenated with frozen ones/zeros for the other ``R - r``;
  2. rebuilds the dense weight ``W = U_R · diag(Σ') · V_Rᵀ`` with the full basis
     ``U_R (D, R)``, ``V_Rᵀ (R, K)``, going through an explicit ``R x R`` diagonal
     matrix as that code does (``torch.diag`` then two matmuls: ≈ 2·D·R·(R + K) FLOPs,
     independent of the batch);
  3. adds its low-rank term ``X · Y`` in the *dense* space (``X (D, r')``,
     ``Y (r', K)``), which is how that code shapes it;
  4. runs ``F.linear(x, W, bias)``.

  Its autograd graph keeps the dense D x K weight and the products that built it, and
  the backward runs the rebuild backwards too. (That code also returns a scalar
  regulariser on ``a``, ``b``, ``X``, ``Y``; it costs O(R + (D + K)·r') and is left out.)

* :func:`unfused_salt_chain` -- SALT written the obvious way in PyTorch, the baseline
  of ``benchmarks/bench_cpu_backend.py``. The ``reference`` backend is the same chain
  with the bias and the low-rank mix fused through ``addmm``.

Neither dense nor official baseline is written for speed: they model what people run today.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_linear(x, weight, bias):
    """``nn.Linear``'s computation: ``y = x Wᵀ + b``."""
    return F.linear(x, weight, bias)


def unfused_salt_chain(x, U, V, sigma, X, Y, bias):
    """``z = x V;  t = z * σ + (z Yᵀ) Xᵀ;  y = t Uᵀ + b`` with autograd, nothing fused."""
    z = x @ V
    t = z * sigma + (z @ Y.t()) @ X.t()
    y = t @ U.t()
    return y if bias is None else y + bias


def official_salt_forward(x, U_full, S_full, Vh_full, scale, shift, scale_frozen, shift_frozen,
                          lora_X, lora_Y, bias):
    """One forward of the official SALT layer (steps 1-4 in the module docstring).

    ``U_full (D, R)``, ``S_full (R,)``, ``Vh_full (R, K)``: full SVD of the pretrained
    weight (frozen). ``scale``/``shift`` (r,): trainable; ``scale_frozen`` (ones) and
    ``shift_frozen`` (zeros) of length ``R - r`` complete them. ``lora_X (D, r')``,
    ``lora_Y (r', K)``: trainable dense-space low-rank term.
    """
    s = F.relu(torch.cat([scale, scale_frozen]) * S_full + torch.cat([shift, shift_frozen]))
    weight = U_full @ torch.diag(s) @ Vh_full
    if lora_X.shape[1] > 0:
        weight = weight + lora_X @ lora_Y
    return F.linear(x, weight, bias)


def official_salt_params(weight: torch.Tensor, rank: int, lora_rank: int, *, generator=None):
    """Official-SALT tensors for a pretrained ``weight (D, K)``: full SVD (float32, then
    cast to the weight's dtype), ``scale = 1``, ``shift = 0``, and ``lora_X``, ``lora_Y``
    drawn from N(0, 0.01²) as that code initialises them. Returns a dict of the
    arguments of :func:`official_salt_forward` except ``x`` and ``bias``."""
    D, K = weight.shape
    R = min(D, K)
    dt, dev = weight.dtype, weight.device
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)

    def randn(*shape):
        where = generator.device if generator is not None else "cpu"
        return (torch.randn(*shape, generator=generator, device=where) * 0.01).to(device=dev, dtype=dt)

    return dict(
        U_full=U.to(dt), S_full=S.to(dt), Vh_full=Vh.to(dt),
        scale=torch.ones(rank, device=dev, dtype=dt), shift=torch.zeros(rank, device=dev, dtype=dt),
        scale_frozen=torch.ones(R - rank, device=dev, dtype=dt),
        shift_frozen=torch.zeros(R - rank, device=dev, dtype=dt),
        lora_X=randn(D, lora_rank), lora_Y=randn(lora_rank, K),
    )


def official_rebuild_flops(D: int, K: int, lora_rank: int) -> int:
    """FLOPs the official layer spends rebuilding its dense weight, per forward."""
    R = min(D, K)
    return 2 * D * R * (R + K) + 2 * D * lora_rank * K
