"""``SALTConv2d``: SALT for ``nn.Conv2d`` (official SALT adapts SAM's neck convolutions).

The kernel ``W (out, in, kh, kw)`` is flattened to ``(out, in*kh*kw)`` and replaced by
its truncated SVD ``U diag(sigma) V^T``. The forward never builds the dense kernel:

    Z = conv2d(x, V^T as r filters (r, in, kh, kw), stride, padding, dilation)   "shrink"
    y = conv2d(Z, (U C) as a 1x1 kernel (out, r, 1, 1), bias)                     "mix + expand"

with ``C = diag(sigma') + s X Y``. Folding the r x r mix into the 1x1 expansion costs
``out * r * r`` FLOPs once per call instead of a pass over the ``N x r x H' x W'`` map,
and both steps run as ordinary convolutions (cuDNN / oneDNN, any memory format,
autocast). The variants (``sigma_mode``, ``residual``) and the regulariser come from
:class:`~salt_kernels.layers.SALTAdapterMixin`, shared with ``SALTLinear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..backends.core import accumulate_dtype
from .linear import SVD_METHODS, SALTAdapterMixin, _check_finite, _check_ranks


def conv2d_shrink(x: torch.Tensor, V: torch.Tensor, conv) -> torch.Tensor:
    """``Z = conv2d(x, V^T as r filters)``: the shrink step, ``(N, r, H', W')``. ``conv``
    gives the geometry (``in_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``: an ``nn.Conv2d`` or a ``SALTConv2d``)."""
    # V^T (r, in*kh*kw) viewed as r filters: a view of V, no copy.
    filters = V.t().reshape(V.shape[1], conv.in_channels, *conv.kernel_size)
    return F.conv2d(x, filters, None, conv.stride, conv.padding, conv.dilation)


def salt_conv2d(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, C: torch.Tensor, bias, conv) -> torch.Tensor:
    """The convolution with kernel ``U C V^T`` (reshaped to ``conv``'s kernel) plus ``bias``,
    without forming the kernel: the shrink, then ``U C`` as a 1x1 convolution. ``C (r, r)``
    is folded into the expansion in float32 (``out * r * r`` FLOPs, once per call)."""
    expand = (U.to(C.dtype) @ C).to(U.dtype)  # (out, r): U C, tiny
    return F.conv2d(conv2d_shrink(x, V, conv), expand[:, :, None, None], bias)


class SALTConv2d(SALTAdapterMixin, nn.Module):
    """A SALT ``nn.Conv2d`` (``groups=1``, ``padding_mode="zeros"``).

    Frozen parameters: ``U (out_channels, r)``, ``V (in_channels*kh*kw, r)`` and, with
    ``residual=True``, ``residual_weight (out, in, kh, kw)``; buffer ``sigma0 (r,)``;
    trained: ``sigma`` (or ``alpha``, ``beta``), ``X (r, r')``, ``Y (r', r)``, ``bias (out,)``.
    ``rank`` is at most ``min(out_channels, in_channels*kh*kw)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        lora_rank: int,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        scaling: float = 1.0,
        device=None,
        dtype=None,
        *,
        sigma_mode: str = "direct",
        residual: bool = False,
    ):
        super().__init__()
        kernel_size = _pair(kernel_size)
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not all(isinstance(k, int) and k >= 1 for k in kernel_size):
            raise ValueError(f"kernel_size: expected positive ints, got {kernel_size!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding: expected 'same', 'valid', an int or a pair, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding: 'same' needs stride 1 (as in nn.Conv2d), got stride {self.stride}")
        fan_in = in_channels * kernel_size[0] * kernel_size[1]
        self._init_salt(fan_in, out_channels, rank, lora_rank, bias, scaling, sigma_mode, residual,
                        (out_channels, in_channels, *kernel_size), {"device": device, "dtype": dtype})
        self.reset_parameters()

    def _conv(self, x, weight, bias=None):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"x: expected shape (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        self._check_input_dtype(x)
        acc = accumulate_dtype(self.U.dtype)
        if self.residual_weight is None:
            return salt_conv2d(x, self.U, self.V, self.mix(acc), self.bias, self)
        y = self._conv(x, self.residual_weight, self.bias)
        return y.add_(salt_conv2d(x, self.U, self.V, self.mix(acc), None, self))

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        rank: int,
        lora_rank: int,
        *,
        scaling: float = 1.0,
        svd: str = "exact",
        sigma_mode: str = "direct",
        residual: bool = False,
    ) -> "SALTConv2d":
        """Build from a pretrained ``nn.Conv2d`` (any kernel size, stride, padding,
        dilation; ``groups=1``, ``padding_mode="zeros"``): rank-``rank`` SVD of its kernel
        flattened to ``(out, in*kh*kw)``, in float32 on its device; bias copied."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv: groups={conv.groups} is not supported, SALTConv2d needs groups=1")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"conv: padding_mode={conv.padding_mode!r} is not supported, SALTConv2d needs 'zeros'"
            )
        if svd not in SVD_METHODS:
            raise ValueError(f"svd: expected one of {SVD_METHODS}, got {svd!r}")
        W = conv.weight
        _check_ranks(rank, lora_rank, W[0].numel(), conv.out_channels)
        _check_finite("conv: weight", W)
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank, lora_rank,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            bias=conv.bias is not None, scaling=scaling, device=W.device, dtype=W.dtype,
            sigma_mode=sigma_mode, residual=residual,
        )
        layer._init_from_pretrained(W, conv.bias, svd)
        return layer

    @torch.no_grad()
    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the merged kernel (merged in float32, cast once)."""
        dtype, device = self.U.dtype, self.U.device
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, bias=self.bias is not None,
                         device=device, dtype=dtype)
        conv.weight.copy_(self.merged_weight().reshape(conv.weight.shape).to(dtype))
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"{self._salt_repr()}"
        )
