"""SALT as a PEFT method: ``get_peft_model(model, SaltConfig(...))``.

Importing this module (it needs ``peft >= 0.15``) registers the method ``"salt"`` with
PEFT, after which the usual PEFT workflow applies::

    import salt_kernels.peft  # registers SaltConfig with PEFT
    from salt_kernels.peft import SaltConfig
    from peft import get_peft_model, PeftModel

    model = get_peft_model(base, SaltConfig(rank=0.5, lora_rank=8, target_modules=["query", "value"]))
    model.print_trainable_parameters()
    ... train (e.g. transformers.Trainer) ...
    model.save_pretrained("adapter/")     # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(fresh_base, "adapter/")
    merged = model.merge_and_unload()

How a layer works. The wrapped ``nn.Linear`` (weight W) stays as PEFT's ``base_layer``;
each adapter is a :class:`~salt_kernels.SALTLinear` core (``salt_core[adapter]``, built by
the package's SVD with its sign convention) holding the frozen ``U_r``, ``V_r``,
``sigma0`` and the trained ``sigma`` (or ``alpha``, ``beta``), ``X``, ``Y``. Forward runs
:func:`~salt_kernels.salt_linear` (any backend):

* ``residual=True``: ``y = W x + b + U_r (C - Sigma0) V_r^T x`` -- the pretrained layer
  plus a rank-r update; equal to the base at init; no residual matrix is stored (W is it);
  several active adapters add their updates.
* ``residual=False`` (SALT's truncated form, the package default): ``y = U_r C V_r^T x + b``.

The adapter file holds the trained tensors and, per layer, a small basis check (r row
indices of U and the entries there, as :func:`~salt_kernels.save_salt` writes): loading
recomputes the SVD of the base weight, flips singular pairs whose sign differs, and
refuses a base the adapter was not trained on. ``svd="lowrank"`` (randomised) or
``store_basis=True`` store ``U``, ``V``, ``sigma0`` too.
"""

from __future__ import annotations

import enum
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

try:
    import peft as _peft
except ImportError as exc:  # pragma: no cover - exercised only without peft
    raise ImportError("salt_kernels.peft needs the 'peft' package: pip install 'peft>=0.15'") from exc

from packaging.version import Version

MIN_PEFT_VERSION = "0.15.0"


def _check_peft_version(version: str) -> None:
    """Raise ImportError for a PEFT older than :data:`MIN_PEFT_VERSION` (no
    ``register_peft_method``, a different tuner contract)."""
    if Version(version) < Version(MIN_PEFT_VERSION):
        raise ImportError(
            f"salt_kernels.peft supports peft >= {MIN_PEFT_VERSION}, found peft {version}: "
            f"pip install -U 'peft>={MIN_PEFT_VERSION}'"
        )


_check_peft_version(_peft.__version__)

from peft.config import PeftConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge  # noqa: E402
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402
from peft.utils import PeftType, register_peft_method  # noqa: E402

from ..model.basis import align_basis, basis_check  # noqa: E402
from ..model.convert import _check_rank_spec, _layer_rank  # noqa: E402
from ..model.export import lora_factors  # noqa: E402
from ..nn import SALTLinear  # noqa: E402
from ..nn.linear import SIGMA_MODES, SVD_METHODS  # noqa: E402
from ..ops import salt_linear  # noqa: E402

METHOD_NAME = "salt"
PREFIX = "salt_"


# --------------------------------------------------------------------------- config


@dataclass
class SaltConfig(PeftConfig):
    """Configuration of a SALT adapter (see :func:`salt_kernels.apply_salt` for the method).

    rank: an int (capped at each layer's ``min(in, out)``) or a float in (0, 1], the
        fraction of ``min(in, out)`` kept. Alternative: ``energy``.
    energy: keep the smallest rank retaining this fraction of ``sum(sigma**2)`` per layer.
    lora_rank: ``r'`` of the ``X (r, r')``, ``Y (r', r)`` update (capped at the layer's
        rank); 0 trains the singular values alone.
    target_modules: module names (exact or dotted suffix), a regex, or ``"all-linear"``.
    scaling: ``s`` in ``C = diag(sigma') + s X Y``.
    sigma_mode: ``"direct"`` (train sigma) or ``"scale_shift"`` (``relu(alpha sigma0 + beta)``).
    residual: keep the pretrained weight's remainder: the layer is ``W + U_r (C - Sigma0) V_r^T``
        (equal to the base at init, exportable to LoRA at rank r); ``False`` is SALT's
        truncated ``U_r C V_r^T``.
    svd: ``"exact"`` or ``"lowrank"`` (randomised; its basis is always saved).
    store_basis: also save ``U``, ``V``, ``sigma0`` in the adapter file (default: only with
        ``svd="lowrank"``).
    backend: the :func:`salt_kernels.salt_linear` backend (``"auto"`` picks the fastest).
    """

    rank: Optional[Union[int, float]] = field(default=None, metadata={"help": "SALT rank r: int, or fraction of min(in, out)"})
    energy: Optional[float] = field(default=None, metadata={"help": "keep this fraction of the squared spectrum"})
    lora_rank: int = field(default=8, metadata={"help": "rank r' of the X Y update"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "names / regex / 'all-linear' of the nn.Linear layers to adapt"}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "names / regex to skip"})
    scaling: float = field(default=1.0, metadata={"help": "s in diag(sigma') + s X Y"})
    sigma_mode: str = field(default="direct", metadata={"help": "'direct' or 'scale_shift'"})
    residual: bool = field(default=False, metadata={"help": "keep W - U_r S_r V_r^T (lossless at init)"})
    svd: str = field(default="exact", metadata={"help": "'exact' or 'lowrank'"})
    store_basis: Optional[bool] = field(default=None, metadata={"help": "save U, V, sigma0 in the adapter"})
    backend: str = field(default="auto", metadata={"help": "salt_linear backend"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "extra modules trained and saved in full (e.g. a task head)"}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SALT
        _check_rank_spec(self.rank, self.energy)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, numbers.Integral) or self.lora_rank < 0:
            raise ValueError(f"lora_rank: expected an int >= 0, got {self.lora_rank!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, numbers.Real) or not math.isfinite(self.scaling):
            raise ValueError(f"scaling: expected a finite float, got {self.scaling!r}")
        if self.sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode: expected one of {SIGMA_MODES}, got {self.sigma_mode!r}")
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual: expected a bool, got {type(self.residual).__name__}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd: expected one of {SVD_METHODS}, got {self.svd!r}")
        if self.store_basis is not None and not isinstance(self.store_basis, bool):
            raise TypeError(f"store_basis: expected None or a bool, got {type(self.store_basis).__name__}")
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                setattr(self, key, set(value))


# --------------------------------------------------------------------------- layer


def _align_after_load(core: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook of a SALT core: the basis check now holds the signs the
    trained X, Y assume; flip the recomputed singular pairs to match."""
    align_basis(core._salt_name, core, core.basis_row.cpu(), core.basis_value.float().cpu(),
                 caller="PeftModel.from_pretrained", remedy="create the adapter with SaltConfig(store_basis=True)")


class SaltLayer(BaseTunerLayer):
    """PEFT tuner layer around an ``nn.Linear``: one :class:`SALTLinear` core per adapter."""

    adapter_layer_names = ("salt_core",)
    other_param_names = ("salt_residual",)

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.salt_core = nn.ModuleDict({})
        self.salt_residual: dict[str, bool] = {}
        self._salt_unmerged_weight = None  # the base weight while a truncated adapter is merged
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @torch.no_grad()
    def update_layer(self, adapter_name: str, config: SaltConfig, name: str = "") -> None:
        weight = self.get_base_layer().weight
        rank = _layer_rank(weight, config.rank, config.energy)
        core = SALTLinear(self.in_features, self.out_features, rank, min(config.lora_rank, rank), bias=False,
                          scaling=config.scaling, device=weight.device, dtype=weight.dtype,
                          backend=config.backend, sigma_mode=config.sigma_mode)
        core._init_from_pretrained(weight, None, config.svd)
        store = config.store_basis if config.store_basis is not None else config.svd == "lowrank"
        # Buffers, not the frozen parameters SALTLinear uses: PEFT's set_adapter calls
        # requires_grad_(True) on the whole core, which would unfreeze a parameter basis.
        # Unstored, they are recomputed from the base weight on load.
        for key in ("U", "V", "sigma0"):
            basis = getattr(core, key).detach()
            delattr(core, key)
            core.register_buffer(key, basis, persistent=store)
        row, value = basis_check(core.U)
        core.register_buffer("basis_row", row.to(weight.device))
        core.register_buffer("basis_value", value.to(weight.device))
        core._salt_name = f"{name}[{adapter_name}]" if name else adapter_name
        core.register_load_state_dict_post_hook(_align_after_load)
        self.salt_core[adapter_name] = core
        self.salt_residual[adapter_name] = config.residual
        self.set_adapter(self.active_adapters)

    # --- merging --------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """What merging ``adapter_name`` adds to the base weight (float32): the SALT update
        ``U (C - Sigma0) V^T`` (residual) or ``U C V^T - W`` (truncated)."""
        core = self.salt_core[adapter_name]
        if self.salt_residual[adapter_name]:
            B, A = lora_factors(core)
            return B @ A
        merged = core.merged_weight()
        original = self._salt_unmerged_weight if self._salt_unmerged_weight is not None else self.get_base_layer().weight
        return merged - original.to(merged.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.salt_core]
        truncated = [a for a in adapter_names if not self.salt_residual[a]]
        if truncated and (len(adapter_names) > 1 or self.merged_adapters):
            raise ValueError(
                f"adapter_names: truncated SALT adapter {truncated[0]!r} replaces the base weight and cannot be "
                f"merged together with other adapters ({adapter_names + self.merged_adapters})"
            )
        base = self.get_base_layer()
        for name in adapter_names:
            core = self.salt_core[name]
            if self.salt_residual[name]:
                B, A = lora_factors(core)
                new = torch.addmm(base.weight.to(B.dtype), B, A)
            else:
                self._salt_unmerged_weight = base.weight.data
                new = core.merged_weight()
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"adapter {name!r}: merged weight has NaN/inf; the adapter seems broken")
            base.weight.data = new.to(base.weight.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self.salt_residual[name]:
                B, A = lora_factors(self.salt_core[name])
                base.weight.data = torch.addmm(base.weight.to(B.dtype), B, A, alpha=-1).to(base.weight.dtype)
            else:
                base.weight.data = self._salt_unmerged_weight
                self._salt_unmerged_weight = None

    # --- forward --------------------------------------------------------------------
    def _salt(self, name: str, x: torch.Tensor, bias) -> torch.Tensor:
        core = self.salt_core[name]
        sigma = core.effective_sigma()
        if self.salt_residual[name]:
            sigma = sigma - core.sigma0.to(sigma.dtype)  # the update only: W x comes from the base layer
        dt = core.U.dtype  # PEFT may keep adapter parameters in fp32 over a half-precision base
        return salt_linear(x.to(dt), core.U, core.V, sigma.to(dt), core.X.to(dt), core.Y.to(dt),
                           None if bias is None else bias.to(dt), scaling=core.scaling, backend=core.backend)


class SaltLinear(nn.Module, SaltLayer):
    """An ``nn.Linear`` adapted by SALT (see :class:`SaltLayer`)."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: SaltConfig, name: str = "") -> None:
        super().__init__()
        SaltLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.salt_core]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        truncated = [a for a in active if not self.salt_residual[a]]
        if truncated:
            if len(active) > 1:
                raise ValueError(
                    f"active adapters {active}: truncated SALT adapter {truncated[0]!r} replaces the base layer "
                    "and cannot be combined with other adapters; activate one at a time"
                )
            return self._salt(truncated[0], x, self.get_base_layer().bias)
        y = self.base_layer(x, *args, **kwargs)
        for name in active:
            y = y + self._salt(name, x, None).to(y.dtype)
        return y

    def __repr__(self) -> str:
        return "salt." + super().__repr__()


# --------------------------------------------------------------------------- tuner


def _is_abstract(name: str) -> bool:
    return getattr(getattr(BaseTuner, name, None), "__isabstractmethod__", False) or not hasattr(BaseTuner, name)


class SaltModel(BaseTuner):
    """The PEFT tuner for SALT: replaces the targeted ``nn.Linear`` layers by :class:`SaltLinear`."""

    prefix: str = PREFIX
    tuner_layer_cls = SaltLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError("target_modules: SaltConfig needs target_modules (names, a regex or 'all-linear')")
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key=None, **kwargs):
        if isinstance(target, SaltLayer):
            target.update_layer(adapter_name, peft_config, current_key or target_name)
            return
        if not isinstance(target, nn.Linear):
            raise TypeError(
                f"target_modules: {current_key or target_name!r} is a {type(target).__name__}; SALT adapts nn.Linear layers"
            )
        new = SaltLinear(target, adapter_name, peft_config, current_key or target_name)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        setattr(parent, target_name, new)

    # PEFT 0.15 leaves these to each tuner; newer BaseTuners implement them (keep theirs).
    if _is_abstract("_mark_only_adapters_as_trainable"):
        def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
            for n, p in model.named_parameters():
                if self.prefix not in n:
                    p.requires_grad = False

    if _is_abstract("enable_adapter_layers"):
        def enable_adapter_layers(self) -> None:
            for module in self.model.modules():
                if isinstance(module, (BaseTunerLayer,)):
                    module.enable_adapters(True)

        def disable_adapter_layers(self) -> None:
            for module in self.model.modules():
                if isinstance(module, (BaseTunerLayer,)):
                    module.enable_adapters(False)

    if not hasattr(BaseTuner, "set_adapter"):
        def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
            for module in self.model.modules():
                if isinstance(module, SaltLayer):
                    if module.merged:
                        warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                        module.unmerge()
                    module.set_adapter(adapter_name)
            self.active_adapter = adapter_name

    if not hasattr(BaseTuner, "merge_and_unload"):
        def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
            if merge:
                self._check_merge_allowed()
            targets = [(n, m) for n, m in self.model.named_modules() if isinstance(m, SaltLayer)]
            for name, module in targets:
                if merge:
                    module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, module.get_base_layer())
            return self.model

        def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
            return self._unload_and_optionally_merge(safe_merge=safe_merge, adapter_names=adapter_names)

        def unload(self):
            return self._unload_and_optionally_merge(merge=False)

    if not hasattr(BaseTuner, "delete_adapter"):
        def delete_adapter(self, adapter_name: str) -> None:
            if adapter_name not in self.peft_config:
                raise ValueError(f"adapter_name: {adapter_name!r} does not exist")
            del self.peft_config[adapter_name]
            remaining = []
            for module in self.model.modules():
                if isinstance(module, SaltLayer):
                    module.delete_adapter(adapter_name)
                    remaining = module.active_adapters[:]
            self.active_adapter = remaining

    if "__getattr__" not in BaseTuner.__dict__:
        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                if name == "model":
                    raise
                return getattr(self.model, name)


# --------------------------------------------------------------------------- registration


def _add_peft_type(name: str) -> PeftType:
    """``PeftType.<NAME>``, adding the member if PEFT does not define it. ``register_peft_method``
    requires the name to be a ``PeftType`` member, and Enum has no public way to extend
    one; the member is built as ``EnumType`` builds its own (str value, ``_name_``,
    ``_value_``, sort order) and entered in the three lookup tables (by name, by value,
    iteration order), so that ``PeftType.SALT``, ``PeftType("SALT")``, ``list(PeftType)``
    and JSON configs with ``"peft_type": "SALT"`` all work."""
    if name in PeftType.__members__:
        return PeftType[name]
    if not (issubclass(PeftType, str) and issubclass(PeftType, enum.Enum)):
        raise ImportError(f"salt_kernels.peft: unsupported peft {_peft.__version__}: PeftType is not a str Enum")
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)  # bypass EnumType's guard against new attributes
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register() -> None:
    """Register SALT with PEFT (done on import; calling again is a no-op). Re-registers the
    classes after ``importlib.reload``; refuses to replace another package's "salt" method."""
    from peft import mapping

    peft_type = _add_peft_type(METHOD_NAME.upper())
    current = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if current is SaltConfig and mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is SaltModel:
        return
    if current is None:
        register_peft_method(name=METHOD_NAME, config_cls=SaltConfig, model_cls=SaltModel, prefix=PREFIX)
        return
    if getattr(current, "__module__", None) != __name__:
        raise RuntimeError(
            f"peft: a PEFT method named {METHOD_NAME!r} is already registered by {current.__module__}."
            f"{current.__qualname__}; salt_kernels.peft cannot register its own"
        )
    # this module was reloaded: point PEFT at the new classes
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = SaltConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = SaltModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX


register()

__all__ = ["MIN_PEFT_VERSION", "SaltConfig", "SaltLayer", "SaltLinear", "SaltModel", "register"]
