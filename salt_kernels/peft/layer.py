"""The PEFT tuner layers: one SVD basis per base layer, shared by its adapters; one small
core per adapter.

A ``SaltLayer`` wraps a base layer (PEFT's ``base_layer``: ``nn.Linear``, transformers'
``Conv1D`` or ``nn.Conv2d``) whose weight, as a matrix ``W (out, in)`` (a Conv1D weight
transposed, a kernel flattened to ``(out, in*kh*kw)``), has the truncated SVD
``U_R diag(sigma0) V_R^T``. The layer holds that basis once (buffers ``salt_U``,
``salt_V``, ``salt_sigma0``, not saved: recomputed from the base, or read from an
adapter file that carries it), at the largest rank R any of its adapters uses. Each
adapter is a :class:`SaltCore` (``salt_core[name]``): its trained ``sigma`` (or
``alpha``, ``beta``), ``X``, ``Y`` of rank ``r <= R``, over the first r columns of the
basis. Adding an adapter of rank ``<= R`` computes no SVD.

* ``residual=True``: ``y = base(x) + U_r (C - Sigma0) V_r^T x``, the base layer plus a
  rank-r update (equal to the base at init); several active adapters add their updates.
* ``residual=False``: ``y = U_r C V_r^T x + b``, SALT's truncated layer, which replaces
  the base layer (active alone).

A base layer loaded in 4 or 8 bits (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, as
QLoRA's) stays as it is: the SVD is of its dequantized weight (float32), the residual
form runs the quantized layer itself, and merging quantizes the merged weight again in
its format (as PEFT's LoRA does).

An adapter's file holds its trained tensors and a basis check (for each of its r columns
of U the row of the largest entry and that entry; with ``store_basis``, ``U``, ``V``,
``sigma0`` themselves). Loading ties the adapter to the layer's basis: the pairs whose
sign the SVD returned differently are undone by conjugating the adapter (``X -> S X``,
``Y -> Y S``, which is the same layer), and a base the adapter was not trained on is
refused, unless the file carries its basis and the caller asks for it
(:func:`allow_other_base`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import types
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..backends.core import accumulate_dtype, autocast_active, mix_matrix
from ..model.basis import align_basis, basis_check
from ..model.convert import _layer_rank
from ..model.export import lora_factors
from ..nn.conv import conv2d_shrink, salt_conv2d
from ..nn.conv1d import is_conv1d
from ..nn.linear import SALTAdapterMixin, truncated_svd
from ..nn.quantized import dequantize_linear, linear_format, requantize_linear_
from ..ops import salt_linear, salt_linear_multi

# How far a stored basis may be from diagonalising the base weight (relative, Frobenius),
# and from another copy of itself column by column: rounding of a half-precision basis.
_BASIS_TOL = 2e-2
_OTHER_BASE = contextvars.ContextVar("salt_kernels_peft_other_base", default=False)
_LOADING = "loading a SALT adapter"


@contextlib.contextmanager
def allow_other_base():
    """Inside this block, loading an adapter whose file carries its basis (``store_basis``,
    ``svd="lowrank"``) onto a base model it was not trained on is allowed: the layer uses
    the file's basis. Outside it such a load is refused, as is any adapter file without a
    basis on another base."""
    token = _OTHER_BASE.set(True)
    try:
        yield
    finally:
        _OTHER_BASE.reset(token)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a call to ``.to`` when it is there already (a dispatch
    each, and a decode step's update makes several)."""
    return t if t.dtype == dtype else t.to(dtype)


def _column_signs(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """+-1 per column if the unit columns of ``a`` and ``b`` agree up to sign, else None."""
    dots = (a.detach().float().cpu() * b.detach().float().cpu()).sum(0)
    if ((dots.abs() - 1).abs() > _BASIS_TOL).any():
        return None
    return torch.where(dots < 0, -1.0, 1.0)


def _basis_error(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, sigma0: torch.Tensor) -> float:
    """``||U^T W V - diag(sigma0)||_F / ||sigma0||``: zero when ``U``, ``V``, ``sigma0`` are
    singular triplets of ``W`` (exact or randomised SVD alike)."""
    dev = W.device
    U, V, s = (t.detach().to(dev, torch.float32) for t in (U, V, sigma0))
    E = U.t() @ W.detach().float() @ V - torch.diag(s)
    return float(torch.linalg.matrix_norm(E) / torch.linalg.vector_norm(s).clamp_min(1e-30))


# --------------------------------------------------------------------------- one adapter


class SaltCore(SALTAdapterMixin, nn.Module):
    """One SALT adapter of a :class:`SaltLayer`: trained ``sigma`` (or ``alpha``, ``beta``),
    ``X (r, r')``, ``Y (r', r)``; ``U``, ``V``, ``sigma0`` are the first r columns of the
    layer's shared basis. With ``lora_rank=0`` ``X``, ``Y`` are empty buffers, not
    parameters (nothing trainable of size zero)."""

    residual_weight = None  # residual mode: the base layer's weight is the residual
    bias = None  # the base layer's bias is the layer's

    def __init__(self, layer: "SaltLayer", adapter_name: str, rank: int, lora_rank: int, config, device, dtype):
        super().__init__()
        self.__dict__["_layer"] = layer  # the owner, not a submodule
        self.adapter_name = adapter_name
        self.out_features, self.in_features = layer._salt_shape
        self.rank, self.lora_rank = rank, lora_rank
        self.scaling = float(config.scaling)
        self.sigma_mode = config.sigma_mode
        self.backend = config.backend
        self.svd = config.svd
        self.stores_basis = config.stores_basis
        factory = {"device": device, "dtype": dtype}
        if self.sigma_mode == "direct":
            self.sigma = nn.Parameter(torch.empty(rank, **factory))
        else:
            self.alpha = nn.Parameter(torch.empty(rank, **factory))
            self.beta = nn.Parameter(torch.empty(rank, **factory))
        if lora_rank > 0:
            self.X = nn.Parameter(torch.empty(rank, lora_rank, **factory))
            self.Y = nn.Parameter(torch.empty(lora_rank, rank, **factory))
        else:
            self.register_buffer("X", torch.zeros(rank, 0, **factory), persistent=False)
            self.register_buffer("Y", torch.zeros(0, rank, **factory), persistent=False)
        self.register_state_dict_post_hook(_core_state_dict_hook)
        self.register_load_state_dict_pre_hook(_core_load_pre_hook)
        self.register_load_state_dict_post_hook(_core_load_post_hook)

    def _basis(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[-1] == self.rank else t[..., : self.rank]

    @property
    def U(self) -> torch.Tensor:
        return self._basis(self._layer.salt_U)

    @property
    def V(self) -> torch.Tensor:
        return self._basis(self._layer.salt_V)

    @property
    def sigma0(self) -> torch.Tensor:
        return self._basis(self._layer.salt_sigma0)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the adapter runs in: its trained parameters' (float32 under PEFT's
        ``autocast_adapter_dtype``, as LoRA's A and B)."""
        return (self.sigma if self.sigma_mode == "direct" else self.alpha).dtype

    def is_meta(self) -> bool:
        return any(p.is_meta for p in self.parameters(recurse=False))

    @torch.no_grad()
    def reset(self, init_weights: bool) -> None:
        """``init_weights=True``: ``sigma' = sigma0``, ``X`` random, ``Y = 0`` (``X Y = 0``);
        ``False``: also ``Y`` random and ``sigma'`` moved off ``sigma0`` by ~10 %."""
        self.reset_sigma()
        self.reset_adapter()
        if init_weights:
            return
        if self.lora_rank > 0:
            nn.init.kaiming_uniform_(self.Y, a=math.sqrt(5))
        if self.sigma_mode == "direct":
            self.sigma.mul_(1 + 0.1 * torch.randn_like(self.sigma))
        else:
            self.alpha.add_(0.1 * torch.randn_like(self.alpha))
            self.beta.add_(0.1 * self.sigma0.to(self.beta.dtype) * torch.randn_like(self.beta))

    def coefficients(self, residual: bool, dtype: torch.dtype, fold_scaling: bool = True):
        """``(sigma, X, Y)`` of the update this adapter adds (``residual``: ``sigma' - sigma0``)
        or of its whole truncated layer, in ``dtype``, with ``scaling`` folded into ``X``
        (``fold_scaling=False``: not folded, for a caller that passes it to the op, one
        multiplication less per call)."""
        sigma = _cast(self.effective_sigma(), dtype)
        if residual:
            sigma = sigma - _cast(self.sigma0, dtype)  # the update only: W x comes from the base layer
        X = _cast(self.X, dtype)
        return sigma, (X * self.scaling if fold_scaling else X), _cast(self.Y, dtype)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, lora_rank={self.lora_rank}, scaling={self.scaling}, "
                f"sigma_mode={self.sigma_mode!r}, backend={self.backend!r}")


def _core_state_dict_hook(core: SaltCore, state_dict: dict, prefix: str, local_metadata) -> None:
    """Add the adapter's basis check (and, with ``store_basis``, its basis) to its state dict:
    what ties the trained ``X``, ``Y`` to the base they were trained on."""
    layer, r = core._layer, core.rank
    check = layer._salt_check
    if check is None:  # the basis is not computed yet (PEFT's low_cpu_mem_usage): shapes only
        state_dict[prefix + "basis_row"] = torch.empty(r, dtype=torch.int64, device="meta")
        state_dict[prefix + "basis_value"] = torch.empty(r, device="meta")
    else:
        state_dict[prefix + "basis_row"] = check[0][:r].clone()
        state_dict[prefix + "basis_value"] = check[1][:r].clone()
    if core.stores_basis:
        for key in ("U", "V", "sigma0"):
            state_dict[prefix + key] = getattr(core, key).detach().contiguous()


_INCOMING = ("basis_row", "basis_value", "U", "V", "sigma0")


def _core_load_pre_hook(core: SaltCore, state_dict: dict, prefix: str, *args) -> None:
    """Take the basis check (and a stored basis) out of the state dict being loaded; the
    post hook ties the adapter to the layer's basis with them."""
    incoming = {k: state_dict.pop(prefix + k) for k in _INCOMING if prefix + k in state_dict}
    trained = prefix + ("sigma" if core.sigma_mode == "direct" else "alpha") in state_dict
    if incoming or trained:
        core.__dict__["_salt_incoming"] = incoming


def _core_load_post_hook(core: SaltCore, incompatible_keys) -> None:
    incoming = core.__dict__.pop("_salt_incoming", None)
    if incoming is not None:
        core._layer._salt_adopt(core, incoming)


# --------------------------------------------------------------------------- the layer


class SaltLayer(BaseTunerLayer):
    """PEFT tuner layer: the shared basis of its base layer and one :class:`SaltCore` per
    adapter (module docstring). Subclasses say how the base weight is a matrix and how an
    update runs (:class:`SaltLinear`, :class:`SaltConv2d`)."""

    adapter_layer_names = ("salt_core",)
    other_param_names = ("salt_residual",)

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.salt_core = nn.ModuleDict({})
        self.salt_residual: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        for key in ("salt_U", "salt_V", "salt_sigma0"):
            self.register_buffer(key, None, persistent=False)
        self._salt_check = None  # (row, value) of every basis column, on the CPU
        self._salt_spectrum = None  # all singular values, once computed (energy ranks)
        self._salt_unmerged_weight = None  # the base weight while a truncated adapter is merged
        self._salt_name = ""

    # --- what a subclass defines ----------------------------------------------------
    @property
    def _salt_shape(self) -> tuple[int, int]:
        """(out, in) of the weight as a matrix."""
        raise NotImplementedError

    def _salt_matrix(self) -> torch.Tensor:
        """The base weight as an (out, in) matrix (a view)."""
        raise NotImplementedError

    def _salt_to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        """An (out, in) matrix in the base weight's layout."""
        raise NotImplementedError

    def _salt_quantized(self) -> bool:
        """Whether the base layer is a bitsandbytes 4/8-bit layer."""
        return linear_format(self.get_base_layer()) is not None

    def _salt_base_weight(self) -> torch.Tensor:
        """The base weight in its layout, as a float tensor (a 4/8-bit one dequantized)."""
        base = self.get_base_layer()
        return dequantize_linear(base) if self._salt_quantized() else base.weight

    def _salt_store_weight(self, weight: torch.Tensor) -> None:
        """Make ``weight`` (the base layout) the base weight; a 4/8-bit one quantized again."""
        base = self.get_base_layer()
        if self._salt_quantized():
            requantize_linear_(base, weight)
        else:
            base.weight.data = weight.to(base.weight.dtype)

    # --- the shared basis -----------------------------------------------------------
    def _salt_has_basis(self) -> bool:
        return self.salt_U is not None and not self.salt_U.is_meta

    def _salt_rank(self, config) -> int:
        W = self._salt_matrix()
        if config.energy is not None and self._salt_spectrum is None:
            self._salt_spectrum = torch.linalg.svdvals(W.detach().float()).cpu()
        return _layer_rank(W, config.rank, config.energy, spectrum=self._salt_spectrum)

    @torch.no_grad()
    def _salt_set_basis(self, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor) -> None:
        weight = self._salt_matrix()
        dtype = self.salt_U.dtype if self.salt_U is not None else weight.dtype
        # copies: a slice of the SVD's full output would keep all of it alive
        self.salt_U, self.salt_V, self.salt_sigma0 = (
            t.detach().to(weight.device, dtype, copy=True).contiguous() for t in (U, V, S))
        self._salt_check = basis_check(self.salt_U)

    @torch.no_grad()
    def _salt_ensure_rank(self, rank: int, svd: str) -> None:
        """Make the shared basis hold at least ``rank`` columns: one SVD of the base weight
        if it has fewer (none at all for the first adapter)."""
        if self._salt_has_basis() and self.salt_U.shape[1] >= rank:
            return
        if self.salt_U is not None and self.salt_U.is_meta:  # other adapters still loading: their rank too
            rank = max(rank, self.salt_U.shape[1])
        U, S, V = truncated_svd(self._salt_matrix(), rank, svd)
        if self._salt_has_basis():  # extend: the adapters' X, Y live in the columns there are
            R = self.salt_U.shape[1]
            signs = _column_signs(self.salt_U, U[:, :R])
            if signs is None:
                raise ValueError(
                    f"layer {self._salt_name!r}: cannot extend the shared basis from rank {R} to {rank}: the new "
                    f"SVD's leading vectors differ from the shared ones (svd={svd!r}). Add the adapter of the "
                    "largest rank first, or use svd='exact'"
                )
            U[:, :R], V[:, :R], S[:R] = self.salt_U, self.salt_V, self.salt_sigma0
        self._salt_set_basis(U, V, S)

    def _salt_meta_basis(self, rank: int) -> None:
        """Shapes only (PEFT's low_cpu_mem_usage): computed when the adapter's values load."""
        D, K = self._salt_shape
        dtype = self._salt_matrix().dtype
        self.salt_U, self.salt_V, self.salt_sigma0 = (
            torch.empty(shape, device="meta", dtype=dtype) for shape in ((D, rank), (K, rank), (rank,)))

    def _salt_upcast_basis(self) -> None:
        """Half-precision basis -> float32, with the adapters (PEFT's ``autocast_adapter_dtype``)."""
        if self.salt_U is not None and self.salt_U.dtype in (torch.float16, torch.bfloat16):
            self.salt_U, self.salt_V, self.salt_sigma0 = (t.float() for t in (self.salt_U, self.salt_V, self.salt_sigma0))

    # --- adapters -------------------------------------------------------------------
    @torch.no_grad()
    def update_layer(self, adapter_name: str, config, name: str = "") -> None:
        self._salt_name = self._salt_name or name
        weight = self._salt_matrix()
        rank = self._salt_rank(config)
        core = SaltCore(self, adapter_name, rank, min(config.lora_rank, rank), config, weight.device, weight.dtype)
        if core.is_meta():  # created under PEFT's low_cpu_mem_usage: values arrive with load_state_dict
            if self.salt_U is None or (self.salt_U.is_meta and self.salt_U.shape[1] < rank):
                self._salt_meta_basis(rank)
        else:
            self._salt_ensure_rank(rank, config.svd)
            core.reset(config.init_weights)
        self.salt_core[adapter_name] = core
        self.salt_residual[adapter_name] = config.residual
        self.set_adapter(self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if not self.salt_core:  # the last adapter: the basis goes with it
            self.salt_U = self.salt_V = self.salt_sigma0 = None
            self._salt_check = self._salt_spectrum = None

    @torch.no_grad()
    def _salt_adopt(self, core: SaltCore, incoming: dict) -> None:
        """Tie a just-loaded adapter to the layer's basis (module docstring): its stored basis
        or the base's SVD, with signs undone and another base refused."""
        where = f"{self._salt_name}[{core.adapter_name}]"
        r = core.rank
        others = [n for n in self.salt_core if n != core.adapter_name]
        if "U" in incoming:
            U, V, S = (incoming[k] for k in ("U", "V", "sigma0"))
            D, K = self._salt_shape
            if tuple(U.shape) != (D, r) or tuple(V.shape) != (K, r) or tuple(S.shape) != (r,):
                raise ValueError(f"{_LOADING}: layer {where!r}: the stored basis has shapes U {tuple(U.shape)}, "
                                 f"V {tuple(V.shape)}, sigma0 {tuple(S.shape)}; this layer needs ({D}, {r}), ({K}, {r}), ({r},)")
            signs = None
            if others and self._salt_has_basis():  # the layer's basis is shared: the file's must be it
                R = min(r, self.salt_U.shape[1])
                signs = _column_signs(U[:, :R], self.salt_U[:, :R])
                if signs is None:
                    raise ValueError(
                        f"{_LOADING}: layer {where!r}: the adapter carries its own basis, which differs from the "
                        f"basis the layer's other adapters {others} share (one basis per layer). Load it into a "
                        "model without them, or train the adapters with svd='exact'"
                    )
                if R == r:  # conjugate into the shared basis
                    return self._salt_conjugate(core, signs)
            error = _basis_error(self._salt_matrix(), U, V, S)
            if error > _BASIS_TOL and not _OTHER_BASE.get():
                raise ValueError(
                    f"{_LOADING}: layer {where!r}: the adapter's stored basis does not match this base model's "
                    f"weight (|U^T W V - Sigma0| / |Sigma0| = {error:.3g}): it was trained on another base. To use "
                    "it on this base anyway, load it inside `with salt_kernels.peft.allow_other_base():`"
                )
            if signs is None:  # the layer's only adapter: its basis is the file's, bit for bit
                self._salt_set_basis(U, V, S)
                return
            # the file's basis extends the shared one: its leading columns are the shared ones up to signs
            R = self.salt_U.shape[1]
            self._salt_set_basis(*(torch.cat([old, new[..., R:].to(old)], dim=-1) for old, new in
                                   ((self.salt_U, U), (self.salt_V, V), (self.salt_sigma0, S))))
            return self._salt_conjugate(core, torch.cat([signs, torch.ones(r - R)]))
        self._salt_ensure_rank(r, core.svd)
        if "basis_row" not in incoming:
            warnings.warn(f"{_LOADING}: layer {where!r}: the file has no basis check; assuming the base's SVD signs")
            return
        # align_basis flips the pairs of what it is given: give it a copy and compare.
        probe = types.SimpleNamespace(U=core.U.detach().clone(), V=torch.empty(0, r, device=self.salt_U.device))
        align_basis(where, probe, incoming["basis_row"].cpu().long(), incoming["basis_value"].float().cpu(),
                    caller=_LOADING, remedy="save the adapter with SaltConfig(store_basis=True)")
        flipped = (probe.U != core.U).any(0).cpu()
        self._salt_conjugate(core, torch.where(flipped, -1.0, 1.0))

    @staticmethod
    def _salt_conjugate(core: SaltCore, signs: torch.Tensor) -> None:
        """Express ``core`` in a basis whose pair i is flipped where ``signs[i] = -1``:
        ``C -> S C S``, i.e. ``X -> S X``, ``Y -> Y S`` (sigma is diagonal, unchanged)."""
        if core.lora_rank == 0 or bool((signs > 0).all()):
            return
        s = signs.to(core.X.device)
        core.X.mul_(s[:, None].to(core.X.dtype))
        core.Y.mul_(s[None, :].to(core.Y.dtype))

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.salt_core]

    # --- merging --------------------------------------------------------------------
    def _salt_delta_matrix(self, adapter_name: str) -> torch.Tensor:
        core = self.salt_core[adapter_name]
        if self.salt_residual[adapter_name]:
            B, A = lora_factors(core)
            return B @ A
        merged = core.merged_weight()
        original = self._salt_unmerged_weight
        original = self._salt_matrix() if original is None else self._salt_weight_matrix(original)
        return merged - original.to(merged.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """What merging ``adapter_name`` adds to the base weight, in its layout (float32): the
        SALT update ``U (C - Sigma0) V^T`` (residual) or ``U C V^T - W`` (truncated)."""
        return self._salt_to_weight(self._salt_delta_matrix(adapter_name))

    def _salt_weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (in the base layout) as an (out, in) matrix."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.salt_core]
        truncated = [a for a in adapter_names if not self.salt_residual[a]]
        if truncated and (len(adapter_names) > 1 or self.merged_adapters):
            raise ValueError(
                f"adapter_names: truncated SALT adapter {truncated[0]!r} replaces the base weight and cannot be "
                f"merged together with other adapters ({adapter_names + self.merged_adapters})"
            )
        for name in adapter_names:
            core = self.salt_core[name]
            weight = self._salt_base_weight()
            if self.salt_residual[name]:
                new = weight.to(accumulate_dtype(weight.dtype)) + self.get_delta_weight(name)
            else:
                new = self._salt_to_weight(core.merged_weight())
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"adapter {name!r}: merged weight has NaN/inf; the adapter seems broken")
            if not self.salt_residual[name]:
                self._salt_unmerged_weight = weight.data
            self._salt_store_weight(new)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self.salt_residual[name]:
                delta = self.get_delta_weight(name)
                self._salt_store_weight(self._salt_base_weight().to(delta.dtype) - delta)
            else:
                self._salt_store_weight(self._salt_unmerged_weight)
                self._salt_unmerged_weight = None

    # --- forward --------------------------------------------------------------------
    def _check_forward_args(self, x, *args, **kwargs) -> None:
        """PEFT's checks of ``adapter_names`` (as its LoRA layers make them)."""
        adapter_names = kwargs.get("adapter_names", None)
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first.")

    def _salt_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = self._active()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        truncated = [a for a in active if not self.salt_residual[a]]
        if truncated:
            if len(active) > 1:
                raise ValueError(
                    f"active adapters {active}: truncated SALT adapter {truncated[0]!r} replaces the base layer "
                    "and cannot be combined with other adapters; activate one at a time"
                )
            core = self.salt_core[truncated[0]]
            y = self._salt_update(x, core, core.coefficients(False, core.compute_dtype, fold_scaling=False),
                                  self.get_base_layer().bias)
            # the base layer's output dtype (autocast's, under autocast; the op returns that already)
            return y if y.dtype == x.dtype or autocast_active(x.device.type) else y.to(x.dtype)
        y = self.base_layer(x, *args, **kwargs)
        for name in active:
            core = self.salt_core[name]
            y = y + _cast(self._salt_update(x, core, core.coefficients(True, core.compute_dtype, fold_scaling=False),
                                            None), y.dtype)
        return y

    def _salt_bank(self, present: list[str]):
        """The adapters ``present`` as the op's bank: sigma (A, R), X (A, R, r'), Y (A, r', R),
        each adapter's update (or truncated layer) zero-padded to the basis rank R."""
        cores = [self.salt_core[n] for n in present]
        dtype = cores[0].compute_dtype
        for core in cores[1:]:
            dtype = torch.promote_types(dtype, core.compute_dtype)
        R = self.salt_U.shape[1]
        lora = max(1, max(c.lora_rank for c in cores))
        sigmas, Xs, Ys = [], [], []
        for name, core in zip(present, cores):
            sigma, X, Y = core.coefficients(self.salt_residual[name], dtype)
            pad = R - core.rank
            sigmas.append(F.pad(sigma, (0, pad)))
            Xs.append(F.pad(X, (0, lora - core.lora_rank, 0, pad)))
            Ys.append(F.pad(Y, (0, pad, 0, lora - core.lora_rank)))
        return torch.stack(sigmas), torch.stack(Xs), torch.stack(Ys)

    def _salt_rows(self, adapter_names: list, present: list[str]):
        """Per sample its bank row (-1: the base layer) and, if any sample runs a truncated
        adapter, the mask of those samples; kept for the next call with the same names
        (each step of ``generate``)."""
        device = self.salt_U.device
        key = (tuple(adapter_names), tuple((n, self.salt_residual[n]) for n in present), device)
        cached = self.__dict__.get("_salt_rows_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        row = {n: i for i, n in enumerate(present)}
        index = torch.tensor([row.get(n, -1) for n in adapter_names], dtype=torch.int64, device=device)
        truncated = [n in row and not self.salt_residual[n] for n in adapter_names]
        rows = index, (torch.tensor(truncated, device=device) if any(truncated) else None)
        self.__dict__["_salt_rows_cache"] = (key, rows)
        return rows

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list, **kwargs: Any) -> torch.Tensor:
        """Each sample through its own adapter (``"__base__"``, or an adapter this layer lacks:
        the base layer) in one call of the mixed-adapter op."""
        result = self.base_layer(x, *args, **kwargs)
        present = sorted({n for n in adapter_names if n in self.salt_core})
        if not present:
            return result
        sigma, X, Y = self._salt_bank(present)
        index, truncated = self._salt_rows(adapter_names, present)
        backend = self.salt_core[present[0]].backend
        update = self._salt_mixed_update(x, sigma, X, Y, index, backend).to(result.dtype)
        if truncated is None:
            return result + update
        # a truncated adapter's sample is its SALT layer alone: U C V^T x + b
        bias = self.get_base_layer().bias
        alone = update if bias is None else update + self._salt_bias_shape(bias, update).to(update.dtype)
        mask = truncated.view(-1, *([1] * (result.dim() - 1)))
        return torch.where(mask, alone, result + update)


class _SaltModule(nn.Module):
    """What the concrete tuner layers share as modules: construction with the first
    adapter, and ``forward`` (which must come before ``nn.Module``'s in the MRO)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, name: str = "") -> None:
        super().__init__()
        SaltLayer.__init__(self, base_layer)
        self.in_features, self.out_features = self._salt_features(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._salt_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "salt." + super().__repr__()


class SaltLinear(_SaltModule, SaltLayer):
    """An ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2; its weight is ``(in, out)``,
    ``fan_in_fan_out``) adapted by SALT."""

    def _salt_features(self, base_layer: nn.Module) -> tuple[int, int]:
        self.fan_in_fan_out = is_conv1d(base_layer)
        if self.fan_in_fan_out:
            return tuple(base_layer.weight.shape)
        return base_layer.in_features, base_layer.out_features

    @property
    def _salt_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def _salt_weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.fan_in_fan_out else weight

    def _salt_matrix(self) -> torch.Tensor:
        return self._salt_weight_matrix(self._salt_base_weight())

    def _salt_to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t() if self.fan_in_fan_out else matrix

    def _salt_update(self, x: torch.Tensor, core: SaltCore, coefficients, bias) -> torch.Tensor:
        sigma, X, Y = coefficients  # (scaling not folded into X)
        dtype = sigma.dtype
        return salt_linear(_cast(x, dtype), _cast(core.U, dtype), _cast(core.V, dtype), sigma, X, Y,
                           None if bias is None else _cast(bias, dtype), scaling=core.scaling, backend=core.backend)

    def _salt_mixed_update(self, x, sigma, X, Y, index, backend) -> torch.Tensor:
        dtype = sigma.dtype
        lead = x.shape[:-1]
        rows = index.view(-1, *([1] * (len(lead) - 1))).expand(lead)
        # the index is built from checked names: no range check (a host sync on CUDA)
        return salt_linear_multi(x.to(dtype), self.salt_U.to(dtype), self.salt_V.to(dtype), sigma, X, Y,
                                 backend=backend, adapter_index=rows, base_sigma=torch.zeros_like(sigma[0]),
                                 check_range=False)

    @staticmethod
    def _salt_bias_shape(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return bias


class SaltConv2d(_SaltModule, SaltLayer):
    """An ``nn.Conv2d`` (``groups=1``, ``padding_mode="zeros"``) adapted by SALT: its kernel
    flattened to ``(out, in*kh*kw)``; an update is a convolution with the r right singular
    filters, then ``U C`` as a 1x1 convolution (as :class:`~salt_kernels.SALTConv2d`)."""

    def _salt_features(self, base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_channels, base_layer.out_channels

    @property
    def _salt_shape(self) -> tuple[int, int]:
        weight = self.get_base_layer().weight
        return weight.shape[0], weight[0].numel()

    def _salt_weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def _salt_matrix(self) -> torch.Tensor:
        return self.get_base_layer().weight.flatten(1)

    def _salt_to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.get_base_layer().weight.shape)

    def _salt_update(self, x: torch.Tensor, core: SaltCore, coefficients, bias) -> torch.Tensor:
        sigma, X, Y = coefficients  # (scaling not folded into X)
        dtype = sigma.dtype
        C = mix_matrix(sigma, X, Y, core.scaling, accumulate_dtype(dtype))
        return salt_conv2d(x.to(dtype), core.U.to(dtype), core.V.to(dtype), C,
                           None if bias is None else bias.to(dtype), self.get_base_layer())

    def _salt_mixed_update(self, x, sigma, X, Y, index, backend) -> torch.Tensor:
        """Shared shrink, a per-sample r x r mix, shared 1x1 expansion (base rows: a zero mix)."""
        dtype = sigma.dtype
        z = conv2d_shrink(x.to(dtype), self.salt_V.to(dtype), self.get_base_layer())
        acc = accumulate_dtype(dtype)
        C = (torch.diag_embed(sigma.to(acc)) + X.to(acc) @ Y.to(acc)).to(dtype)  # (A, R, R)
        C = torch.cat([C, torch.zeros_like(C[:1])])  # row -1: the base layer
        t = torch.einsum("nij,njhw->nihw", C[index], z)
        return F.conv2d(t, self.salt_U.to(dtype)[:, :, None, None])

    @staticmethod
    def _salt_bias_shape(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return bias.view(-1, 1, 1)


def make_layer(target: nn.Module, adapter_name: str, config, name: str) -> nn.Module:
    """The SALT tuner layer for ``target``, or a TypeError naming what cannot be adapted."""
    if isinstance(target, nn.Linear) or is_conv1d(target):
        linear_format(target, name=f"target_modules: {name!r}")  # a quantized layer type SALT cannot read
        return SaltLinear(target, adapter_name, config, name)
    if isinstance(target, nn.Conv2d):
        if target.groups != 1 or target.padding_mode != "zeros":
            raise TypeError(
                f"target_modules: {name!r} is an nn.Conv2d with groups={target.groups}, padding_mode="
                f"{target.padding_mode!r}; SALT adapts convolutions with groups=1 and padding_mode='zeros'"
            )
        return SaltConv2d(target, adapter_name, config, name)
    raise TypeError(
        f"target_modules: {name!r} is a {type(target).__module__}.{type(target).__name__}; SALT adapts "
        "nn.Linear, transformers' Conv1D and nn.Conv2d layers"
    )
