"""``SALTConv1D``: SALT for transformers' ``Conv1D`` (GPT-2's attention and MLP layers).

Despite its name, ``Conv1D`` is a linear layer stored transposed: ``y = x W + b`` with
``W (in, out)``. Its SALT layer is a :class:`SALTLinear` of ``W^T`` (the SVD of the
``(out, in)`` matrix, as for ``nn.Linear``); it computes the same function and merges back
into a ``Conv1D``. The package does not import transformers: the base layer is recognised
by its class, and merging imports ``Conv1D`` from the transformers the model uses.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .linear import SALTLinear


def transformers_conv1d():
    """transformers' ``Conv1D`` class, or None if transformers is not loaded (a model that
    has one has loaded it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    conv1d = transformers_conv1d()
    return conv1d is not None and isinstance(module, conv1d)


class _IsConv1D(type):
    def __instancecheck__(cls, module) -> bool:
        return is_conv1d(module)


class TransformersConv1D(metaclass=_IsConv1D):
    """Stands for transformers' ``Conv1D`` in ``isinstance`` checks, without importing it."""


class SALTConv1D(SALTLinear):
    """A :class:`SALTLinear` built from a transformers ``Conv1D``; ``to_conv1d()`` merges it
    back into one. ``in_features``/``out_features`` are the Conv1D's ``nx``/``nf``."""

    fan_in_fan_out = True  # the base layer's weight is (in, out), as PEFT names it

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, rank: int, lora_rank: int, **kwargs) -> "SALTConv1D":
        """Build from a pretrained ``Conv1D`` (``from_linear``'s options): the rank-``rank``
        SVD of its weight transposed, in float32 on its device; bias copied."""
        if not is_conv1d(conv1d):
            raise TypeError(f"conv1d: expected a transformers Conv1D, got {type(conv1d).__name__}")
        # an nn.Linear view of the same weight (transposed) and bias, allocating nothing
        with torch.device("meta"):
            linear = nn.Linear(*conv1d.weight.shape, bias=conv1d.bias is not None)
        linear.weight = nn.Parameter(conv1d.weight.detach().t(), requires_grad=False)
        if conv1d.bias is not None:
            linear.bias = nn.Parameter(conv1d.bias.detach(), requires_grad=False)
        return cls.from_linear(linear, rank, lora_rank, **kwargs)

    @torch.no_grad()
    def to_conv1d(self) -> nn.Module:
        """A transformers ``Conv1D`` with the merged weight (merged in float32, cast once)."""
        from transformers.pytorch_utils import Conv1D

        linear = self.to_linear()
        with torch.device("meta"):
            conv = Conv1D(self.out_features, self.in_features)
        conv.weight = nn.Parameter(linear.weight.detach().t().contiguous())
        conv.bias = nn.Parameter(linear.bias.detach() if linear.bias is not None else
                                 torch.zeros_like(linear.weight[:, 0]))  # Conv1D always adds a bias
        return conv
