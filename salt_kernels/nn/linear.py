"""``SALTLinear``: a drop-in replacement for ``nn.Linear`` computed by :func:`salt_linear`.

The variants of the official SALT layer live here too, all feeding the same op:

* ``sigma_mode="scale_shift"`` trains ``alpha``, ``beta`` with effective singular values
  ``sigma' = relu(alpha * sigma0 + beta)`` (the SALT paper's top-r form); ``"direct"``
  trains ``sigma`` itself. Either way ``sigma'`` goes into :func:`salt_linear` unchanged.
* ``residual=True`` keeps the frozen residual ``W - U_r diag(S_r) V_r^T`` so the layer
  equals the pretrained one at init for any rank (lossless, the PiSSA idea).
  ``quantize="nf4"`` (``"fp4"``, ``"int8"``) stores that residual quantized by
  bitsandbytes (:mod:`.quantized`): SALT on a quantized base. A layer converted from a
  bitsandbytes 4-/8-bit layer keeps that layer's quantized weight as it is instead.

:class:`SALTAdapterMixin` holds what :class:`SALTLinear` and
:class:`~salt_kernels.SALTConv2d` share.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..backends.core import accumulate_dtype, autocast_active, mix_matrix
from ..ops import salt_linear
from ..ops.validate import BACKENDS, FLOAT_DTYPES, _check_tensor
from .quantized import QuantizedWeight, add_quantized_product, linear_dtype, linear_format, quant_format
from .sharding import full

SVD_METHODS = ("exact", "lowrank")
SIGMA_MODES = ("direct", "scale_shift")


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
    _check_tensor("weight", weight, 2)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank: expected an int, got {type(rank).__name__}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank: expected 1 <= rank <= min(weight.shape) = {min(weight.shape)}, got {rank}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd: expected one of {SVD_METHODS}, got {svd!r}")
    _check_finite("weight", weight)
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


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


# What SALT trains in a layer; everything else it holds (U, V, residual_weight) is frozen.
TRAINABLE_NAMES = ("sigma", "alpha", "beta", "X", "Y", "bias")


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


def _check_finite(name: str, t: torch.Tensor) -> None:
    # an SVD of a non-finite matrix fails deep in LAPACK or returns garbage
    if t.device.type != "meta" and not torch.isfinite(t).all():
        raise ValueError(f"{name}: holds NaN or inf; SALT needs the SVD of a finite weight")


def _check_layer_args(scaling, dtype):
    if isinstance(scaling, (bool, torch.Tensor)) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling: expected a float, got {type(scaling).__name__}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling: expected a finite number, got {scaling}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected a floating dtype (float16, bfloat16, float32, float64), got {dtype}")


def _check_variant_args(sigma_mode, residual):
    if sigma_mode not in SIGMA_MODES:
        raise ValueError(f"sigma_mode: expected one of {SIGMA_MODES}, got {sigma_mode!r}")
    if not isinstance(residual, bool):
        raise TypeError(f"residual: expected a bool, got {type(residual).__name__}")


def check_quantize_args(residual, quantize, quantize_blocksize=None, quantize_double=None, quantize_iters=1):
    """The format of a quantized residual (None: not quantized), after checking the
    ``quantize*`` arguments of a layer together with ``residual``."""
    fmt = quant_format(quantize, quantize_blocksize, quantize_double)
    if fmt is not None and residual is not True:
        raise ValueError(
            f"quantize: quantize={quantize!r} needs residual=True (got residual={residual!r}): only the residual "
            "W - U_r diag(sigma) V_r^T is quantized, U_r, V_r and sigma stay in the layer's dtype"
        )
    if isinstance(quantize_iters, bool) or not isinstance(quantize_iters, int) or quantize_iters < 1:
        raise ValueError(f"quantize_iters: expected an int >= 1, got {quantize_iters!r}")
    return fmt


def residual_format_for(linear: nn.Module, residual, quantize=None, quantize_blocksize=None, quantize_double=None,
                        quantize_iters=1):
    """``(format, quantized_base)`` of the quantized weight ``SALTLinear.from_linear``
    gives ``linear`` with these arguments: ``quantize``'s (the residual quantized,
    ``quantized_base`` False); else, with ``residual=True``, a bitsandbytes layer's own
    weight kept as it is (``quantized_base`` True); ``(None, False)`` for a dense
    residual or none."""
    fmt = check_quantize_args(residual, quantize, quantize_blocksize, quantize_double, quantize_iters)
    if fmt is not None:
        return fmt, False
    if quantize_iters != 1:
        raise ValueError(f"quantize_iters: only applies to a residual quantized at conversion (quantize=...), "
                         f"got quantize_iters={quantize_iters}")
    fmt = linear_format(linear) if residual else None
    return fmt, fmt is not None


class SALTAdapterMixin:
    """The SALT parametrisation shared by :class:`SALTLinear` and ``SALTConv2d``.

    A layer with ``out_features`` D and flattened ``in_features`` K holds frozen
    parameters (``requires_grad=False``) ``U (D, r)``, ``V (K, r)`` and optionally
    ``residual_weight`` (the weight's shape); the buffer ``sigma0 (r,)`` (the singular
    values at init/conversion); and trained parameters ``sigma (r,)`` (``"direct"``) or
    ``alpha, beta (r,)`` (``"scale_shift"``), ``X (r, r')``, ``Y (r', r)``, ``bias``.
    """

    # Set on the layer inside salt_kernels.adapters(...); a class default, so that reading
    # it outside that block is a plain lookup (nn.Module's __getattr__ would raise and
    # catch an AttributeError on every forward).
    salt_rows = None

    def _init_salt(self, in_features, out_features, rank, lora_rank, bias, scaling,
                   sigma_mode, residual, residual_shape, factory):
        _check_ranks(rank, lora_rank, in_features, out_features)
        _check_variant_args(sigma_mode, residual)
        _check_layer_args(scaling, factory["dtype"])
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.lora_rank = rank, lora_rank
        self.scaling = float(scaling)
        self.sigma_mode, self.residual = sigma_mode, residual
        # The frozen basis (and residual) are the layer's base weights, so they are frozen
        # nn.Parameters rather than buffers: FSDP2 shards parameters, never buffers, and
        # keeps a full copy of a buffer on every rank (docs/design.md, "Sharding").
        self.U = _frozen(torch.empty(out_features, rank, **factory))
        self.V = _frozen(torch.empty(in_features, rank, **factory))
        # sigma0 is what the regulariser pulls sigma' towards, and the scale_shift base.
        self.register_buffer("sigma0", torch.empty(rank, **factory))
        if sigma_mode == "direct":
            self.sigma = nn.Parameter(torch.empty(rank, **factory))
        else:
            self.alpha = nn.Parameter(torch.empty(rank, **factory))
            self.beta = nn.Parameter(torch.empty(rank, **factory))
        self.X = nn.Parameter(torch.empty(rank, lora_rank, **factory))
        self.Y = nn.Parameter(torch.empty(lora_rank, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # (residual_shape None: the residual is stored quantized, see SALTLinear)
        dense = residual and residual_shape is not None
        self.register_parameter(
            "residual_weight", _frozen(torch.zeros(residual_shape, **factory)) if dense else None
        )
        self.quantized_residual = None
        self.quantized_base = False
        # ||W - base|| / ||W|| (Frobenius) of the weight this layer was converted from, where
        # the base (U_r diag(sigma0) V_r^T + residual) is not W exactly: a quantized residual
        self.base_error: float | None = None

    def _check_input_dtype(self, x: torch.Tensor) -> None:
        """x must have the layer's dtype, as for nn.Linear (autocast casts, so any dtype
        is fine under it). Checked here so that the error names x, not U."""
        if x.dtype != self.U.dtype and not autocast_active(x.device.type):
            raise TypeError(f"x: expected dtype {self.U.dtype} (the layer's dtype), got {x.dtype}")

    # --- initialisation -------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A random layer: orthonormal U, V and sigma = sqrt(out / (3 rank)), which gives
        outputs of the same variance as ``nn.Linear``'s default init (1/3 per unit-variance
        input); X ~ Kaiming, Y = 0; the residual (if any) zero."""
        for basis in (self.U, self.V):
            q, _ = torch.linalg.qr(torch.randn(basis.shape, device=basis.device, dtype=torch.float32))
            basis.copy_(q)
        self.sigma0.fill_(math.sqrt(self.out_features / (3.0 * self.rank)))
        self.reset_sigma()
        self.reset_adapter()
        if self.residual_weight is not None:
            self.residual_weight.zero_()
        if self.quantized_residual is not None:
            self.quantized_residual.zero_()
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def reset_sigma(self) -> None:
        """sigma' = sigma0: ``sigma = sigma0`` (direct) or ``alpha = 1, beta = 0``."""
        if self.sigma_mode == "direct":
            self.sigma.copy_(self.sigma0)
        else:
            self.alpha.fill_(1.0)
            self.beta.zero_()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """X random (Kaiming-uniform, as LoRA's A), Y zero: X @ Y = 0."""
        if self.lora_rank > 0:
            nn.init.kaiming_uniform_(self.X, a=math.sqrt(5))
        self.Y.zero_()

    @torch.no_grad()
    def _init_from_pretrained(self, weight: torch.Tensor, bias, svd: str, quantize_iters: int = 1) -> None:
        """Set U, sigma0, V from the rank-r SVD of ``weight`` (flattened to (D, K)), copy
        ``bias`` (or None) and, with ``residual``, the residual against the factors as
        stored (after the cast to the layer's dtype), so that it absorbs their rounding too.

        A quantized residual: ``Q = quant(W - L)`` with ``L = U_r diag(sigma0) V_r^T``;
        each of ``quantize_iters - 1`` further rounds takes the basis from the SVD of
        ``W - Q`` and quantizes ``W - L`` again (LoftQ's alternation), so that ``L + Q``
        gets closer to ``W``. ``base_error`` records ``||W - L - Q|| / ||W||``."""
        if bias is not None:
            self.bias.copy_(bias)
        acc = accumulate_dtype(self.U.dtype)
        W = weight.detach().reshape(self.out_features, self.in_features)
        self._set_basis(W, svd)
        if self.residual_weight is not None:
            self.residual_weight.copy_((W.to(acc) - self._low_rank(acc)).reshape(self.residual_weight.shape))
        if self.quantized_residual is not None and not self.quantized_base:
            W = W.to(acc)
            for round_ in range(quantize_iters):
                if round_:
                    self._set_basis(W - self.quantized_residual.dequantize(acc), svd)
                low_rank = self._low_rank(acc)
                self.quantized_residual.quantize_(W - low_rank)
            error = W - low_rank - self.quantized_residual.dequantize(acc)
            self.base_error = (torch.linalg.matrix_norm(error) / torch.linalg.matrix_norm(W).clamp_min(1e-30)).item()

    def _set_basis(self, W: torch.Tensor, svd: str) -> None:
        U, S, V = truncated_svd(W, self.rank, svd)
        self.U.copy_(U)
        self.V.copy_(V)
        self.sigma0.copy_(S)
        self.reset_sigma()

    def _low_rank(self, acc: torch.dtype) -> torch.Tensor:
        """``U diag(sigma0) V^T`` (D, K) from the stored factors, in ``acc``."""
        return (self.U.to(acc) * self.sigma0.to(acc)) @ self.V.to(acc).t()

    # --- the parametrisation --------------------------------------------------------
    def effective_sigma(self) -> torch.Tensor:
        """sigma' fed to the op: ``sigma`` (direct) or ``relu(alpha * sigma0 + beta)``."""
        if self.sigma_mode == "direct":
            return self.sigma
        return torch.relu(torch.addcmul(self.beta, self.alpha, self.sigma0.to(self.alpha.dtype)))

    def mix(self, dtype: torch.dtype) -> torch.Tensor:
        """C = diag(sigma') + scaling * X @ Y (r, r) in ``dtype``."""
        return mix_matrix(self.effective_sigma(), self.X, self.Y, self.scaling, dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense weight ``residual + U (diag(sigma') + s X Y) V^T`` as (out, in_flat),
        computed in float32 (float64 for a float64 layer) and returned in that precision."""
        acc = accumulate_dtype(self.U.dtype)
        core = self.mix(acc)
        # (getattr: users of the mixin that hold no residual of their own, PEFT's cores)
        quantized = getattr(self, "quantized_residual", None)
        if getattr(self, "quantized_base", False):
            core -= torch.diag(self.sigma0.to(acc))
        W = self.U.to(acc) @ core @ self.V.to(acc).t()
        if self.residual_weight is not None:
            W += self.residual_weight.reshape(W.shape).to(acc)
        elif quantized is not None:
            W += quantized.dequantize(acc)
        return W

    def regularization(self) -> torch.Tensor:
        """This layer's term of :func:`salt_kernels.salt_regularizer`:
        ``||sigma' - sigma0||_2 + ||scaling * X Y||_F``, in r x r space, float32 (float64
        for float64 parameters)."""
        acc = accumulate_dtype(self.X.dtype)
        # Under FSDP2 the parameters are shards outside forward: gather them (a
        # differentiable collective), so every rank computes the same full term.
        sigma0 = self.sigma0.to(acc)
        get = lambda t: full(t).to(acc)  # noqa: E731
        if self.sigma_mode == "direct":
            drift = get(self.sigma) - sigma0
        else:
            # relu(a s0 + b) - s0 = (a - 1) s0 + b where active, -s0 where clamped. Written
            # this way it does not cancel: a - 1 is exact near a = 1, and the drift is
            # tiny next to s0 early in training (it sets the gradient's direction).
            alpha, beta = get(self.alpha), get(self.beta)
            active = torch.addcmul(beta, alpha, sigma0) > 0
            drift = torch.where(active, torch.addcmul(beta, alpha - 1, sigma0), -sigma0)
        update = self.scaling * (get(self.X) @ get(self.Y))
        return torch.linalg.vector_norm(drift) + torch.linalg.matrix_norm(update)

    def _salt_repr(self) -> str:
        return (
            f"rank={self.rank}, lora_rank={self.lora_rank}, bias={self.bias is not None}, "
            f"scaling={self.scaling}, sigma_mode={self.sigma_mode!r}, residual={self.residual}"
        )


class SALTLinear(SALTAdapterMixin, nn.Module):
    """``y = U (diag(sigma') + scaling * X Y) V^T x + bias`` without forming the dense weight.

    ``U (out, r)`` and ``V (in, r)`` are frozen parameters (``requires_grad=False``, as
    a frozen base weight under PEFT; saved in ``state_dict``, as is the buffer ``sigma0``,
    the singular values at init/conversion); ``sigma (r,)`` (or ``alpha``,
    ``beta`` with ``sigma_mode="scale_shift"``), ``X (r, r')``, ``Y (r', r)`` and ``bias``
    are trained. ``X @ Y`` is zero at init (``Y`` zero, ``X`` random, as LoRA does with B
    and A). ``lora_rank=0`` trains the singular values alone. ``residual=True`` adds the
    frozen ``residual_weight (out, in)``: ``W_res x`` is accumulated into the SALT output
    in place (no extra M x out temporary); a layer built from scratch has a zero residual.
    ``quantize="nf4"`` / ``"fp4"`` / ``"int8"`` (with ``residual=True``) stores the residual
    quantized by bitsandbytes instead, in the submodule ``quantized_residual``
    (``quantize_blocksize``, default 64, and ``quantize_double``, default True, as
    ``bitsandbytes.nn.Linear4bit``): ``y = Q(W_res) x + U C V^T x + b``. With
    ``quantized_base=True`` that submodule holds the whole base weight instead (a
    4-bit model's weight, kept bit for bit) and ``y = Q(W) x + U (C - Sigma0) V^T x + b``,
    the same layer with the residual ``Q(W) - U Sigma0 V^T`` left unquantized.
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
        *,
        sigma_mode: str = "direct",
        residual: bool = False,
        quantize: str | None = None,
        quantize_blocksize: int | None = None,
        quantize_double: bool | None = None,
        quantized_base: bool = False,
    ):
        super().__init__()
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        fmt = check_quantize_args(residual, quantize, quantize_blocksize, quantize_double)
        if not isinstance(quantized_base, bool) or (quantized_base and fmt is None):
            raise ValueError(f"quantized_base: expected a bool, True only with quantize=..., got {quantized_base!r}")
        self._init_salt(in_features, out_features, rank, lora_rank, bias, scaling, sigma_mode, residual,
                        None if fmt else (out_features, in_features), {"device": device, "dtype": dtype})
        if fmt is not None:
            self.quantized_residual = QuantizedWeight(out_features, in_features, fmt, device=device)
            self.quantized_base = quantized_base
        self.backend = backend
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The tensors are read from _parameters: through nn.Module's __getattr__ each read
        # costs about a microsecond, a tenth of a decode step's host time for six of them.
        # A name not there (moved by a parametrization) is read as an attribute.
        p = self._parameters
        U, V, X, Y, bias = (p[n] if n in p else getattr(self, n) for n in ("U", "V", "X", "Y", "bias"))
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != U.dtype:
            self._check_input_dtype(x)
        rows = self.salt_rows
        if rows is None or not isinstance(x, torch.Tensor) or x.dim() == 0:
            sigma = p["sigma"] if self.sigma_mode == "direct" and "sigma" in p else self.effective_sigma()
            op = salt_linear
            if self.quantized_base:
                sigma = self.op_sigma(sigma)
        else:  # a mixed-adapter batch: the adapter bank and per-row indices
            (sigma, X, Y, bias), op = rows.op(self, x)
        if not self.residual or not isinstance(x, torch.Tensor) or x.dim() == 0:
            # (salt_linear's validation reports a bad x)
            return op(x, U, V, sigma, X, Y, bias, scaling=self.scaling, backend=self.backend)
        # Lossless mode: y = SALT(x) + W_res x. Produce y once (bias fused in salt_linear)
        # and accumulate the residual GEMM into it in place: no second M x out tensor.
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = op(x2d, U, V, sigma, X, Y, bias, scaling=self.scaling, backend=self.backend)
        # y's dtype is x's, or the autocast dtype under torch.autocast (as in nn.Linear).
        if self.quantized_residual is not None:
            add_quantized_product(y, x2d.to(y.dtype), self.quantized_residual)
        else:
            y.addmm_(x2d.to(y.dtype), self.residual_weight.to(y.dtype).t())
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

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
        sigma_mode: str = "direct",
        residual: bool = False,
        quantize: str | None = None,
        quantize_iters: int = 1,
        quantize_blocksize: int | None = None,
        quantize_double: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> "SALTLinear":
        """Build from a pretrained ``nn.Linear``: rank-``rank`` SVD of its weight in
        float32 on its device, cast to the layer's dtype; bias copied. ``residual=True``
        also keeps ``W - U_r diag(S_r) V_r^T``, so the layer equals ``linear`` at init.

        ``quantize`` (with ``residual=True``): store that residual in ``"nf4"``, ``"fp4"``
        or ``"int8"`` (bitsandbytes); ``quantize_iters`` rounds of SVD and quantization
        (see ``_init_from_pretrained``).

        ``linear`` may be a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (a model loaded
        in 4 or 8 bits): the SVD is of its dequantized weight, and the layer takes the dtype
        of the model around it (its bias's, else the weight's before quantization). With
        ``residual=True`` the layer keeps ``linear``'s quantized weight bit for bit
        (``quantized_base``), so it equals the quantized layer at init; ``quantize=``
        instead quantizes the residual of the dequantized weight again (an extra
        quantization error on top of the 4-bit model's). ``dtype`` sets that dtype where
        the layer does not tell it (an int8 layer without bias; default float16, the
        dtype of bitsandbytes' 8-bit models); :func:`~salt_kernels.apply_salt` passes the
        model's."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd: expected one of {SVD_METHODS}, got {svd!r}")
        base_format = linear_format(linear)
        fmt, keep_base = residual_format_for(linear, residual, quantize, quantize_blocksize, quantize_double,
                                             quantize_iters)
        _check_ranks(rank, lora_rank, linear.in_features, linear.out_features)
        base = QuantizedWeight.from_bnb_linear(linear) if base_format is not None else None
        W = linear.weight if base is None else base.dequantize(torch.float32)
        if base is None:
            dtype = W.dtype
        else:
            dtype = linear_dtype(linear) or dtype or torch.float16
        _check_finite("linear: weight", W)
        layer = cls(
            linear.in_features, linear.out_features, rank, lora_rank,
            bias=linear.bias is not None, scaling=scaling,
            device=W.device, dtype=dtype, backend=backend,
            sigma_mode=sigma_mode, residual=residual,
            **(fmt.layer_kwargs() if fmt is not None else {}), quantized_base=keep_base,
        )
        if keep_base:
            layer.quantized_residual = base
            layer.base_error = 0.0
        layer._init_from_pretrained(W, linear.bias, svd, quantize_iters)
        return layer

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

    @torch.no_grad()
    def to_quantized_linear(self) -> nn.Module:
        """The merged weight quantized again in the residual's format: a bitsandbytes
        ``Linear4bit`` (``Linear8bitLt`` for int8) in the layer's dtype, the size of the
        4-bit base. Quantizing the merged weight as a whole costs what quantizing the
        original weight does (about QLoRA's base error), not the smaller error of the
        quantized residual; ``to_linear`` keeps the layer exact in its dtype."""
        if self.quantized_residual is None:
            raise ValueError("to_quantized_linear: the layer has no quantized residual (built without quantize=)")
        weight = QuantizedWeight.from_float(self.merged_weight(), self.quantized_residual.format)
        return weight.to_bnb_linear(self.bias, self.U.dtype)

    def op_sigma(self, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """The singular values the op gets for ``sigma'`` (default: the layer's; any
        leading dims): ``sigma'`` itself, or ``sigma' - sigma0`` when the quantized weight is
        the whole base (``quantized_base``: the SALT part then adds ``U (C - Sigma0) V^T``)."""
        sigma = self.effective_sigma() if sigma is None else sigma
        return sigma - self.sigma0.to(sigma.dtype) if self.quantized_base else sigma

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._salt_repr()}, backend={self.backend!r}"
        )
