"""``SALTLinear``: a drop-in replacement for ``nn.Linear`` computed by :func:`salt_linear`."""

from __future__ import annotations

import math

import torch
from torch import nn

from .dispatch import salt_linear

SVD_METHODS = ("exact", "lowrank")


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor):
    """Make an SVD deterministic: flip each singular pair so that the entry of largest
    magnitude in each column of U is positive (U_i -> -U_i with V_i -> -V_i leaves
    U diag(s) V^T unchanged). Different LAPACK/cuSOLVER builds then agree on U, V."""
    idx = U.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(U, 0, idx)).squeeze(0)
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def truncated_svd(weight: torch.Tensor, rank: int, svd: str = "exact", oversample: int = 10, niter: int = 4):
    """Rank-``rank`` SVD of ``weight`` (D, K) computed in float32 on its device.

    Returns ``U (D, r)``, ``S (r,)``, ``V (K, r)`` in float32 with a deterministic sign
    convention. ``svd="lowrank"`` uses randomized ``torch.svd_lowrank`` with
    ``oversample`` extra columns, for layers too big for a full SVD.
    """
    if svd not in SVD_METHODS:
        raise ValueError(f"svd: expected one of {SVD_METHODS}, got {svd!r}")
    W = weight.detach().to(torch.float32)
    D, K = W.shape
    if svd == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        q = min(rank + oversample, D, K)
        U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
        Vh = V.t()
    U, Vh = _fix_signs(U[:, :rank], Vh[:rank])
    return U.contiguous(), S[:rank].contiguous(), Vh.t().contiguous()


def _check_ranks(rank, lora_rank, in_features, out_features):
    for name, v in (("rank", rank), ("lora_rank", lora_rank)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    full = min(in_features, out_features)
    if not 1 <= rank <= full:
        raise ValueError(
            f"rank: expected 1 <= rank <= min(in_features, out_features) = {full}, got {rank}"
        )
    if not 0 <= lora_rank <= rank:
        raise ValueError(f"lora_rank: expected 0 <= lora_rank <= rank = {rank}, got {lora_rank}")


class SALTLinear(nn.Module):
    """``y = U (diag(sigma) + scaling * X Y) V^T x + bias`` without forming the dense weight.

    ``U (out, r)`` and ``V (in, r)`` are frozen buffers (saved in ``state_dict``);
    ``sigma (r,)``, ``X (r, r')``, ``Y (r', r)`` and ``bias`` are trained. ``X @ Y`` is
    zero at init (``Y`` zero, ``X`` random, as LoRA does with B and A). ``lora_rank=0``
    trains the singular values alone.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        lora_rank: int,
        bias: bool = True,
        scaling: float = 1.0,
        device=None,
        dtype=None,
        backend: str = "auto",
    ):
        super().__init__()
        _check_ranks(rank, lora_rank, in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.lora_rank = rank, lora_rank
        self.scaling = float(scaling)
        self.backend = backend
        self.register_buffer("U", torch.empty(out_features, rank, **factory))
        self.register_buffer("V", torch.empty(in_features, rank, **factory))
        self.sigma = nn.Parameter(torch.empty(rank, **factory))
        self.X = nn.Parameter(torch.empty(rank, lora_rank, **factory))
        self.Y = nn.Parameter(torch.empty(lora_rank, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A random layer: orthonormal U, V and sigma = sqrt(out / (3 rank)), which gives
        outputs of the same variance as ``nn.Linear``'s default init (1/3 per unit-variance
        input); X ~ Kaiming, Y = 0."""
        for basis in (self.U, self.V):
            q, _ = torch.linalg.qr(torch.randn(basis.shape, device=basis.device, dtype=torch.float32))
            basis.copy_(q)
        self.sigma.fill_(math.sqrt(self.out_features / (3.0 * self.rank)))
        self.reset_adapter()
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """X random (Kaiming-uniform, as LoRA's A), Y zero: X @ Y = 0."""
        if self.lora_rank > 0:
            nn.init.kaiming_uniform_(self.X, a=math.sqrt(5))
        self.Y.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return salt_linear(
            x, self.U, self.V, self.sigma, self.X, self.Y, self.bias,
            scaling=self.scaling, backend=self.backend,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        lora_rank: int,
        *,
        scaling: float = 1.0,
        svd: str = "exact",
        backend: str = "auto",
    ) -> "SALTLinear":
        """Build from a pretrained ``nn.Linear``: rank-``rank`` SVD of its weight in
        float32 on its device, cast to the layer's dtype; bias copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd: expected one of {SVD_METHODS}, got {svd!r}")
        W = linear.weight
        _check_ranks(rank, lora_rank, linear.in_features, linear.out_features)
        layer = cls(
            linear.in_features, linear.out_features, rank, lora_rank,
            bias=linear.bias is not None, scaling=scaling,
            device=W.device, dtype=W.dtype, backend=backend,
        )
        U, S, V = truncated_svd(W, rank, svd)
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
            layer.sigma.copy_(S)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense weight ``U (diag(sigma) + s X Y) V^T`` (out, in), computed in float32
        (float64 for a float64 layer) and returned in that precision."""
        from .backends.core import accumulate_dtype, mix_matrix

        acc = accumulate_dtype(self.U.dtype)
        C = mix_matrix(self.sigma, self.X, self.Y, self.scaling, acc)
        return self.U.to(acc) @ C @ self.V.to(acc).t()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the merged weight (merged in float32, cast once)."""
        dtype, device = self.U.dtype, self.U.device
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=device, dtype=dtype)
        linear.weight.copy_(self.merged_weight().to(dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, lora_rank={self.lora_rank}, bias={self.bias is not None}, "
            f"scaling={self.scaling}, backend={self.backend!r}"
        )
