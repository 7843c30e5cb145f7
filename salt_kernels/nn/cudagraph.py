"""Warm-up before CUDA-graph capture: autotune and compile every kernel up front."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .linear import SALTLinear


def warmup(model_or_layer: nn.Module, token_counts: Iterable[int], dtype: torch.dtype | None = None,
           backward: bool = True) -> int:
    """Run every SALT layer of ``model_or_layer`` once at each token count, so that the
    Triton kernels are autotuned and compiled before a CUDA graph is captured.

    While a stream captures a CUDA graph nothing may autotune (it times configs) or
    JIT-compile; a SALT launch that would have to raises
    ``salt_kernels.backends.triton.kernels.NotWarmedUpError`` instead (never a silent
    wrong result). Call this first, with:

    * ``token_counts``: every number of rows a layer will see inside the captured graph
      (batch x sequence length, the flattened leading dims of x). Autotuning is keyed on
      power-of-two buckets of it and a few launch parameters depend on it, so warm up
      the exact counts you capture.
    * ``dtype``: the dtype the layers compute in there. ``None``: each layer's own
      parameter dtype. Another dtype (e.g. ``torch.bfloat16`` for fp32 weights): the
      layers run under ``torch.autocast`` with it, as mixed-precision training does.
    * ``backward``: also run the backward (with and without a gradient for the input,
      as for a first and a later layer), for graphs that capture a training step.

    Each ``SALTLinear`` (any module that is or contains one) runs on random input of
    its own ``in_features`` on its own device, in its own backend; gradients are taken
    with ``torch.autograd.grad``, so no ``.grad`` of the model changes and parameters
    are never updated. Upstream gradients are contiguous, as in a usual training step.
    Returns the number of layers warmed up.

    Example::

        salt_kernels.warmup(model, token_counts=[batch * seq_len], dtype=torch.bfloat16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static_input)
    """
    if not isinstance(model_or_layer, nn.Module):
        raise TypeError(f"model_or_layer: expected an nn.Module, got {type(model_or_layer).__name__}")
    counts = [int(m) for m in token_counts]
    if not counts or any(m < 1 for m in counts):
        raise ValueError(f"token_counts: expected positive token counts, got {counts}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
    layers = [m for m in model_or_layer.modules() if isinstance(m, SALTLinear)]
    for layer in layers:
        for M in counts:
            _run_layer(layer, M, dtype, backward)
    return len(layers)


def _run_layer(layer: SALTLinear, M: int, dtype: torch.dtype | None, backward: bool) -> None:
    device, own = layer.U.device, layer.U.dtype
    autocast = dtype is not None and dtype != own
    params = [p for p in layer.parameters() if p.requires_grad]
    for x_grad in ((True, False) if backward else (False,)):
        x = torch.randn(M, layer.in_features, device=device, dtype=own if autocast or dtype is None else dtype)
        x.requires_grad_(x_grad)
        inputs = ([x] if x_grad else []) + params
        with torch.set_grad_enabled(backward), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            y = layer(x)
        if backward and inputs:
            torch.autograd.grad(y, inputs, torch.randn_like(y))
