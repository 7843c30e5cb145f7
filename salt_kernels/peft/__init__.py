"""SALT as a PEFT method: ``get_peft_model(model, SaltConfig(...))``.

Importing this package (it needs ``peft >= 0.15``) registers the method ``"salt"`` with
PEFT, after which the usual PEFT workflow applies::

    import salt_kernels.peft  # registers SaltConfig with PEFT
    from salt_kernels.peft import SaltConfig
    from peft import get_peft_model, PeftModel

    model = get_peft_model(base, SaltConfig(rank=32, lora_rank=8, target_modules=["query", "value"]))
    model.print_trainable_parameters()
    ... train (e.g. transformers.Trainer) ...
    model.save_pretrained("adapter/")     # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(fresh_base, "adapter/")
    model(**batch, adapter_names=["a", "__base__", "b"])   # a mixed batch, one op per layer
    merged = model.merge_and_unload()

Layout, as PEFT's own methods: :mod:`.config` (``SaltConfig``), :mod:`.layer` (the
tuner layers: one shared SVD basis per base layer, one core per adapter; loading
rules), :mod:`.model` (``SaltModel``, the tuner). See docs/model-guide.md, "SALT in PEFT".
"""

from __future__ import annotations

import enum
import importlib

try:
    import peft as _peft
except ImportError as exc:  # pragma: no cover - exercised only without peft
    raise ImportError("salt_kernels.peft needs the 'peft' package: pip install 'peft>=0.15'") from exc

from packaging.version import Version

# importlib.reload(salt_kernels.peft) re-executes this file in the same namespace: the
# submodules are then reloaded too, so that the reloaded package holds new classes.
_RELOADING = "SaltConfig" in globals()

MIN_PEFT_VERSION = "0.15.0"
METHOD_NAME = "salt"


def _check_peft_version(version: str) -> None:
    """Raise ImportError for a PEFT older than :data:`MIN_PEFT_VERSION` (no
    ``register_peft_method``, a different tuner contract)."""
    if Version(version) < Version(MIN_PEFT_VERSION):
        raise ImportError(
            f"salt_kernels.peft supports peft >= {MIN_PEFT_VERSION}, found peft {version}: "
            f"pip install -U 'peft>={MIN_PEFT_VERSION}'"
        )


_check_peft_version(_peft.__version__)

from peft.utils import PeftType, register_peft_method  # noqa: E402


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


_add_peft_type(METHOD_NAME.upper())  # SaltConfig's __post_init__ sets PeftType.SALT

from . import config, layer, model  # noqa: E402

if _RELOADING:
    for _module in (config, layer, model):  # in import order: model imports layer
        importlib.reload(_module)

from .config import SaltConfig  # noqa: E402
from .layer import SaltConv2d, SaltCore, SaltLayer, SaltLinear, allow_other_base  # noqa: E402
from .model import PREFIX, SaltModel  # noqa: E402


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
    if getattr(current, "__module__", None) != SaltConfig.__module__:
        raise RuntimeError(
            f"peft: a PEFT method named {METHOD_NAME!r} is already registered by {current.__module__}."
            f"{current.__qualname__}; salt_kernels.peft cannot register its own"
        )
    # this package was reloaded: point PEFT at the new classes
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = SaltConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = SaltModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX


register()

__all__ = ["MIN_PEFT_VERSION", "SaltConfig", "SaltConv2d", "SaltCore", "SaltLayer", "SaltLinear", "SaltModel",
           "allow_other_base", "register"]
