"""Convert a pretrained model's ``nn.Linear`` and transformers ``Conv1D`` (GPT-2) layers
(and named ``nn.Conv2d`` layers) to SALT
layers in place, in the style of PEFT, and merge them back.

    model = apply_salt(model, rank=0.5, lora_rank=8, target_modules=["query", "value"])
    ... train; save_salt / load_salt (:mod:`.checkpoint`) ...
    plain = merge_salt(model)                      # every SALTLinear -> nn.Linear

The conversion config (options and per-layer ranks) is kept in ``model.salt_config``;
:mod:`.checkpoint` saves it with the trained tensors and converts a plain base again
from it on load (``_make_salt_layer`` is the one place a layer is constructed).
"""

from __future__ import annotations

import json
import math
from collections import Counter
import numbers
import re
from typing import Iterable

import torch
from torch import nn

from ..nn import SALT_MODULE_TYPES, SALTConv1D, SALTConv2d, SALTLinear
from ..nn.conv1d import TransformersConv1D, is_conv1d
from ..nn.linear import SVD_METHODS, TRAINABLE_NAMES, check_quantize_args
from ..nn.quantized import dequantize_linear, import_bitsandbytes, linear_format
from ..nn import sharding
from .adapter_file import FORMAT_NAME, FORMAT_VERSION

_CONFIG_ATTR = "salt_config"
# Show a progress bar over layers when converting at least this many (big models).
_PROGRESS_MIN_LAYERS = 32

# SALT layer type name -> (the base layer it replaces, its constructor from that layer,
# the name of its merge-back method). A new SALT layer kind is added here only.
_KINDS = {
    "SALTLinear": (nn.Linear, SALTLinear.from_linear, "to_linear"),
    "SALTConv2d": (nn.Conv2d, SALTConv2d.from_conv2d, "to_conv2d"),
    "SALTConv1D": (TransformersConv1D, SALTConv1D.from_conv1d, "to_conv1d"),
}
# The kinds "all-linear" (and no target_modules) converts: linear layers, GPT-2's included.
_LINEAR_KINDS = ("SALTLinear", "SALTConv1D")
_BASE_TYPES: tuple[type, ...] = tuple(base for base, _, _ in _KINDS.values())


# --------------------------------------------------------------------------- helpers


def _is_salt(module: nn.Module) -> bool:
    return isinstance(module, SALT_MODULE_TYPES)


def _kind_of_base(module: nn.Module) -> str | None:
    """The SALT layer type that replaces ``module`` (an nn.Linear, Conv1D or nn.Conv2d)."""
    for kind, (base, _, _) in _KINDS.items():
        if type(module) is base or isinstance(module, base):
            return kind
    return None


def _io(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear / SALTLinear / SALTConv1D, channels of a Conv2d /
    SALTConv2d, the weight's (in, out) shape of a transformers Conv1D."""
    if is_conv1d(module):
        return tuple(module.weight.shape)
    if hasattr(module, "in_channels"):  # SALTConv2d also has in_features = in*kh*kw
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def _geometry(module: nn.Module) -> dict:
    """What must match between an adapter's layer and a base layer: sizes, and for a
    convolution its kernel, stride, padding and dilation."""
    inp, out = _io(module)
    geo = {"in_features": inp, "out_features": out}
    if hasattr(module, "kernel_size"):
        for key in ("kernel_size", "stride", "padding", "dilation"):
            v = getattr(module, key)
            geo[key] = list(v) if isinstance(v, tuple) else v
    return geo


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` and at every other name the same module object has: a
    module registered twice (tied / shared layers) stays one shared module."""
    old = model.get_submodule(name)
    aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n]
    for alias in aliases:
        parent_name, _, child = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def _check_target_modules(target_modules):
    if target_modules is None or isinstance(target_modules, str):
        return target_modules
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        items = list(target_modules)
        if not items or not all(isinstance(t, str) and t for t in items):
            raise TypeError(
                "target_modules: expected None, a regex string, or a non-empty list of module "
                f"names, got {target_modules!r}"
            )
        return sorted(set(items))
    raise TypeError(
        "target_modules: expected None, a regex string, or a list of module names, "
        f"got {type(target_modules).__name__}"
    )


def _matches(name: str, target_modules) -> bool:
    """PEFT's rules: ``None`` or ``"all-linear"`` match every layer; a string is a regex
    that must match the full module name; a list matches a name equal to an entry or
    ending in ``"." + entry`` (so ``"query"`` matches ``encoder.layer.0.attention.self.query``)."""
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _check_rank_spec(rank, energy):
    if (rank is None) == (energy is None):
        raise ValueError(
            f"rank / energy: give exactly one of them, got rank={rank!r}, energy={energy!r}"
        )
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
            raise TypeError(f"rank: expected an int or a float in (0, 1], got {type(rank).__name__}")
        if isinstance(rank, numbers.Integral):
            if rank < 1:
                raise ValueError(f"rank: expected an int >= 1, got {rank}")
        elif not (0.0 < float(rank) <= 1.0):
            raise ValueError(f"rank: a float rank is a fraction of min(in, out): expected (0, 1], got {rank}")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
            raise TypeError(f"energy: expected a float in (0, 1], got {type(energy).__name__}")
        if not (0.0 < float(energy) <= 1.0):
            raise ValueError(f"energy: expected a fraction of the squared spectrum in (0, 1], got {energy}")


def _rank_source(module: nn.Module, energy) -> torch.Tensor:
    """The (D, K) matrix a layer's rank is chosen from: its weight (a conv kernel
    flattened); a quantized layer's dequantized (for ``energy``), else only its shape."""
    if linear_format(module) is None:
        return module.weight.flatten(1)
    if energy is not None:
        return dequantize_linear(module)
    return torch.empty(module.out_features, module.in_features, device="meta")


def _check_quantize_kwargs(layer_kwargs: dict) -> None:
    """The quantized-residual options of apply_salt, checked before any layer is touched."""
    keys = ("quantize", "quantize_blocksize", "quantize_double", "quantize_iters")
    if not any(k in layer_kwargs for k in keys):
        return
    check_quantize_args(layer_kwargs.get("residual", False), *(layer_kwargs.get(k) for k in keys[:3]),
                        layer_kwargs.get("quantize_iters", 1))
    if layer_kwargs.get("quantize") is not None:
        import_bitsandbytes()


def _check_target(name: str, module: nn.Module, kind: str, layer_kwargs: dict) -> None:
    """A clear error, naming the layer, for a target SALT cannot convert as asked."""
    if kind == "SALTLinear":
        linear_format(module, name=f"layer {name!r}")
    elif kind not in _LINEAR_KINDS and any(k.startswith("quantize") for k in layer_kwargs):
        raise ValueError(f"quantize: applies to linear layers (nn.Linear, Conv1D); layer {name!r} is a "
                         f"{type(module).__name__} (leave it out of target_modules, or convert it without quantize)")


def residual_format(layer: nn.Module) -> dict | None:
    """The format of a SALT layer's quantized weight, as saved in an adapter's config:
    ``quant_type``, ``blocksize``, ``double_quant`` and ``quantized_base`` (the weight
    is the whole quantized base, not the quantized residual); None without one."""
    q = getattr(layer, "quantized_residual", None)
    return None if q is None else {**vars(q.format), "quantized_base": bool(layer.quantized_base)}


def _layer_rank(weight: torch.Tensor, rank, energy, spectrum: torch.Tensor | None = None) -> int:
    """The rank for one (D, K) weight: an int capped at min(D, K), a fraction of
    min(D, K) (rounded up, at least 1), or the smallest rank keeping ``energy`` of the
    squared spectrum (singular values in float32 on the weight's device, or ``spectrum``
    if the caller has them)."""
    full = min(weight.shape)
    if energy is not None:
        if spectrum is None:
            spectrum = torch.linalg.svdvals(weight.detach().to(torch.float32))
        s2 = spectrum.double() ** 2
        total = s2.sum()
        if total <= 0:
            return 1
        kept = torch.cumsum(s2, 0) / total
        # smallest k with kept[k-1] >= energy; rounding may leave kept[-1] a hair below 1
        return max(1, min(full, int(torch.searchsorted(kept, float(energy) - 1e-12).item()) + 1))
    if isinstance(rank, numbers.Integral):
        return min(int(rank), full)
    return max(1, min(full, math.ceil(float(rank) * full - 1e-9)))


def _json_ready(kwargs: dict) -> dict:
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise TypeError(f"layer options must be JSON-serialisable to be saved: {kwargs!r} ({exc})") from None
    return dict(kwargs)


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype most of ``model``'s parameters have: its activations' dtype."""
    counts = Counter()
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else None


def _make_salt_layer(module: nn.Module, spec: dict, dtype: torch.dtype | None = None) -> nn.Module:
    """Build the SALT layer for ``module`` from a per-layer spec (the one place a
    layer is constructed, used by both ``apply_salt`` and ``load_salt``); ``dtype``, the
    model's, for a quantized layer that does not tell its own (see ``SALTLinear.from_linear``)."""
    if spec["type"] not in _KINDS:
        raise ValueError(f"unknown SALT layer type {spec['type']!r}, expected one of {sorted(_KINDS)}")
    base, convert, _ = _KINDS[spec["type"]]
    if not isinstance(module, base):
        raise TypeError(f"expected an nn.{base.__name__} to convert to {spec['type']}, got {type(module).__name__}")
    extra = {"dtype": dtype} if base is nn.Linear and linear_format(module) is not None else {}
    return convert(
        module, spec["rank"], spec["lora_rank"], scaling=spec["scaling"], svd=spec["svd"],
        **spec.get("kwargs", {}), **extra,
    )


def _layer_spec(name: str, layer: nn.Module, svd: str, kwargs: dict) -> dict:
    return {
        "type": type(layer).__name__,
        **_geometry(layer),
        "rank": layer.rank,
        "lora_rank": layer.lora_rank,
        "bias": layer.bias is not None,
        "scaling": layer.scaling,
        "svd": svd,
        "kwargs": kwargs,
        "residual_format": residual_format(layer),
    }


def _freeze(model: nn.Module, train_bias: bool) -> None:
    """Only SALT's sigma/X/Y (and SALT biases with ``train_bias``) stay trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if _is_salt(m):
            for pname, p in m.named_parameters(recurse=False):
                # U, V, residual_weight are frozen parameters: they stay frozen
                p.requires_grad_(pname in TRAINABLE_NAMES and (pname != "bias" or train_bias))


def _progress(items: list, enabled, desc: str):
    if enabled is None:
        enabled = len(items) >= _PROGRESS_MIN_LAYERS
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer")


# --------------------------------------------------------------------------- public API


def apply_salt(
    model: nn.Module,
    *,
    rank: int | float | None = None,
    lora_rank: int,
    target_modules: str | Iterable[str] | None = None,
    scaling: float = 1.0,
    svd: str = "exact",
    energy: float | None = None,
    freeze_base: bool = True,
    train_bias: bool = False,
    progress: bool | None = None,
    **layer_kwargs,
) -> nn.Module:
    """Replace matching ``nn.Linear`` layers of ``model`` in place by ``SALTLinear`` (and
    transformers ``Conv1D`` layers, GPT-2's, by ``SALTConv1D``).

    rank: an int (capped at each layer's ``min(in, out)``) or a float in (0, 1], the
        fraction of ``min(in, out)`` kept (rounded up). Alternative: ``energy``.
    energy: keep the smallest rank whose singular values retain this fraction of
        ``sum(sigma**2)`` (per layer).
    lora_rank: ``r'`` of the ``X (r, r')``, ``Y (r', r)`` update; capped at each layer's
        rank. 0 trains the singular values alone.
    target_modules: ``None`` / ``"all-linear"`` (every ``nn.Linear`` and ``Conv1D``), a regex matched
        against full module names, or a list of names matched exactly or as a dotted
        suffix (PEFT's rules). ``nn.Conv2d`` layers (``groups=1``) become ``SALTConv2d``
        when named by a regex or list; the default converts Linear layers only.
    freeze_base: freeze every parameter except SALT's ``sigma``, ``X``, ``Y`` (and the
        SALT biases when ``train_bias``, like PEFT's ``bias="lora_only"``).
    progress: progress bar over layers (default: on for 32 layers or more).
    layer_kwargs: passed to the layer constructor (``SALTLinear.from_linear``) and
        saved with the adapter; must be JSON-serialisable. E.g. ``residual=True,
        quantize="nf4"`` (``"fp4"``, ``"int8"``; ``quantize_iters``,
        ``quantize_blocksize``, ``quantize_double``): the residual stored quantized by
        bitsandbytes.

    SVDs run in float32 on each layer's device, one layer at a time; layers keep their
    dtype. Target layers may be bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (a model
    loaded in 4 or 8 bits): each is dequantized to float32, decomposed and, with
    ``residual=True``, its residual quantized again in the layer's own format. The
    options and per-layer ranks are recorded in ``model.salt_config`` for :func:`save_salt`.
    """
    _check_model(model)
    converted = [n for n, m in model.named_modules() if _is_salt(m)]
    if converted:
        raise ValueError(
            f"model: already converted ({len(converted)} SALT layers, e.g. {converted[0]!r}); "
            "apply_salt converts a plain base model once. To load an adapter use load_salt; "
            "to convert again, start from the base model (or merge_salt this one first)"
        )
    _check_rank_spec(rank, energy)
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, numbers.Integral):
        raise TypeError(f"lora_rank: expected an int, got {type(lora_rank).__name__}")
    if lora_rank < 0:
        raise ValueError(f"lora_rank: expected an int >= 0, got {lora_rank}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(float(scaling)):
        raise TypeError(f"scaling: expected a finite float, got {scaling!r}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd: expected one of {SVD_METHODS}, got {svd!r}")
    target_modules = _check_target_modules(target_modules)
    layer_kwargs = _json_ready(layer_kwargs)
    _check_quantize_kwargs(layer_kwargs)
    # plain Python numbers (e.g. not numpy scalars) so that the config is JSON
    if rank is not None:
        rank = int(rank) if isinstance(rank, numbers.Integral) else float(rank)
    energy = None if energy is None else float(energy)

    targets, matched_other, seen = [], [], set()
    # A module registered under several names matches through any of them and is
    # converted once, under its first name (the one named_parameters and save_salt use).
    first_name = {id(m): n for n, m in model.named_modules()}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or id(module) in seen or not _matches(name, target_modules):
            continue
        kind = _kind_of_base(module)
        every_linear = target_modules is None or target_modules == "all-linear"
        if kind in _LINEAR_KINDS or (kind is not None and not every_linear):
            targets.append((first_name[id(module)], module, kind))
            seen.add(id(module))
        else:
            matched_other.append((name, module))
    if not targets:
        extra = ""
        if matched_other:
            kinds = ", ".join(f"{n} ({type(m).__name__})" for n, m in matched_other[:5])
            extra = f"; these names matched but are not nn.Linear / Conv1D / nn.Conv2d: {kinds}"
        raise ValueError(
            f"target_modules: {target_modules!r} matched no nn.Linear / Conv1D (or named nn.Conv2d) in the model{extra}"
        )
    for name, module, kind in targets:
        _check_target(name, module, kind, layer_kwargs)

    config = getattr(model, _CONFIG_ATTR, None) or {"layers": {}}
    layers = config["layers"]
    dtype = model_dtype(model)
    for name, base, kind in _progress(targets, progress, "apply_salt"):
        # a conv kernel (out, in, kh, kw) is decomposed as the (out, in*kh*kw) matrix
        r = _layer_rank(_rank_source(base, energy), rank, energy)
        spec = {"type": kind, "rank": r, "lora_rank": min(int(lora_rank), r),
                "scaling": float(scaling), "svd": svd, "kwargs": layer_kwargs}
        layer = _make_salt_layer(base, spec, dtype)
        _replace_module(model, name, layer)
        layers[name] = _layer_spec(name, layer, svd, layer_kwargs)

    config.update(
        format=FORMAT_NAME, version=FORMAT_VERSION, rank=rank, energy=energy,
        lora_rank=int(lora_rank),
        target_modules=target_modules if not isinstance(target_modules, list) else list(target_modules),
        scaling=float(scaling), svd=svd, freeze_base=bool(freeze_base), train_bias=bool(train_bias),
        layer_kwargs=layer_kwargs,
    )
    setattr(model, _CONFIG_ATTR, config)
    if freeze_base:
        _freeze(model, train_bias)
    return model


@torch.no_grad()
def merge_salt(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Replace every SALT layer by a plain ``nn.Linear`` / ``Conv1D`` / ``nn.Conv2d`` holding its merged weight
    (merged in float32, cast once to the layer's dtype) and return ``model``.

    A layer with a quantized residual (``quantize=``) merges to a dense ``nn.Linear`` in
    its dtype, exact: ``dequantized residual + U C V^T``. With ``requantize=True`` it
    becomes a bitsandbytes ``Linear4bit`` (``Linear8bitLt``) holding the merged weight
    quantized again in the residual's format: the 4-bit model's size, at the price of
    quantizing the whole merged weight (about QLoRA's base error rather than the smaller
    one of the quantized residual).

    Like PEFT's ``merge_and_unload``, this modifies ``model`` in place and returns the
    same object: merge a ``copy.deepcopy(model)`` to keep the SALT model. The merged
    layers' parameters require grad as the SALT layer's ``sigma`` did; the rest of the
    model is untouched."""
    _check_model(model)
    if not isinstance(requantize, bool):
        raise TypeError(f"requantize: expected a bool, got {type(requantize).__name__}")
    if _is_salt(model):
        raise TypeError("model: merge_salt replaces layers inside a model; call .to_linear() on a bare SALT layer")
    salt_layers = [(n, m) for n, m in model.named_modules() if _is_salt(m)]
    if not salt_layers:
        raise ValueError("model: has no SALT layers to merge (apply_salt or load_salt converts a model)")
    if sharding.is_sharded(model):
        raise ValueError(
            "model: merge_salt needs an unsharded model (it builds each dense weight); load the "
            "adapter into an unsharded copy of the base with load_salt and merge that"
        )
    for name, layer in salt_layers:
        if requantize and getattr(layer, "quantized_residual", None) is not None:
            merged = layer.to_quantized_linear()
        else:
            merged = getattr(layer, _KINDS[type(layer).__name__][2])()
        trainable = any(p.requires_grad for p in layer.parameters())
        for p in merged.parameters():
            p.requires_grad_(trainable and p.is_floating_point())  # (not a 4-bit packed weight)
        _replace_module(model, name, merged)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


