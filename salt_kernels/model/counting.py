"""Counting what a model trains, as PEFT reports it."""

from __future__ import annotations

from torch import nn

from ..nn.quantized import QuantizedWeight
from .convert import _check_model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` element counts. ``total`` is every parameter, the frozen
    SALT bases (``U``, ``V``, a residual: frozen parameters) included, each tied or
    shared tensor once. ``sigma0`` (a buffer: the singular values at conversion, kept
    for the regulariser) is bookkeeping and not counted. A quantized residual (buffers)
    counts its out x in values, as PEFT counts a 4-bit weight. On a model sharded by
    FSDP2 the counts are of the full (unsharded) tensors."""
    _check_model(model)
    params = {id(p): p for p in model.parameters()}  # tied weights once
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    quantized = {id(m): m for m in model.modules() if isinstance(m, QuantizedWeight)}
    total += sum(m.out_features * m.in_features for m in quantized.values())
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: N || all params: M || trainable%: P`` (and return None,
    as PEFT does; :func:`trainable_parameters` returns the numbers)."""
    trainable, total = trainable_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")
