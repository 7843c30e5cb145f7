"""``salt_regularizer``: the term the official SALT code adds to the loss."""

from __future__ import annotations

import torch
from torch import nn

from .linear import SALTAdapterMixin


def salt_regularizer(model: nn.Module) -> torch.Tensor:
    """Sum over the SALT layers in ``model`` (``SALTLinear``, ``SALTConv2d``; ``model``
    itself may be one) of ``||sigma' - sigma0||_2 + ||scaling * X Y||_F``.

    ``sigma'`` is the effective singular values (``sigma``, or ``relu(alpha * sigma0 +
    beta)`` with ``sigma_mode="scale_shift"``) and ``sigma0`` the frozen singular values
    at init/conversion. Everything is r x r (never the dense weight), in float32 (float64
    for float64 parameters). It is zero at init, with zero (not NaN) gradients.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    total = None
    for module in model.modules():
        if isinstance(module, SALTAdapterMixin):
            term = module.regularization()
            total = term if total is None else total + term.to(total.device)
    if total is None:
        raise ValueError(f"model: contains no SALT layers ({type(model).__name__})")
    return total
