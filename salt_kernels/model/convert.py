"""Model-level SALT in the style of PEFT: convert a pretrained model's ``nn.Linear``
layers in place, count what trains, merge back, and save / load only the trained
tensors.

    model = apply_salt(model, rank=0.5, lora_rank=8, target_modules=["query", "value"])
    print_trainable_parameters(model)
    ... train ...
    save_salt(model, "adapter.safetensors")        # trained tensors + conversion config
    fresh = load_salt(fresh_base, "adapter.safetensors")   # plain or pre-converted base
    plain = merge_salt(model)                      # every SALTLinear -> nn.Linear

File format (safetensors):

* tensors: every parameter that requires grad, under its name in the model (the SALT
  ``sigma``/``X``/``Y`` and anything else the user unfroze, e.g. a task head); with
  ``include_basis=True`` also each SALT layer's frozen ``U`` and ``V``; and per SALT
  layer a tiny *basis check* (``r`` row indices and the entries of ``U`` there) that
  ``load_salt`` uses to undo SVD sign flips and to refuse a base model that is not the
  one the adapter was trained on.
* metadata ``"salt_config"``: JSON with the conversion options and, per converted
  layer, its type, sizes, rank, lora_rank, scaling, svd method and any extra
  constructor options, so that a plain base can be converted again on load.
* metadata ``"salt_checksum"``: SHA-256 digests of every tensor and of the config,
  verified on load (see :mod:`salt_kernels.adapter_file`: atomic writes, integrity).

Why the basis check: trained ``X``, ``Y`` live in the singular basis ``U``, ``V``. An
SVD is unique only up to the sign of each singular pair, and two LAPACK builds may
disagree; ``truncated_svd`` fixes a convention, but the argmax it relies on can tie.
Loading compares the recomputed ``U`` with the stored entries and flips pairs that
disagree (``U_i, V_i -> -U_i, -V_i`` leaves the base weight unchanged), so the trained
model is reproduced whatever sign the SVD returned. Randomised ``svd="lowrank"`` is not
reproducible beyond signs, so its basis is always stored.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from typing import Iterable

import torch
from torch import nn

from . import _sharding, adapter_file
from .adapter_file import FORMAT_NAME, FORMAT_VERSION
from .conv import SALTConv2d
from .layers import SVD_METHODS, TRAINABLE_NAMES, SALTLinear

_CHECK_PREFIX = "__salt_basis_check__."
_CONFIG_ATTR = "salt_config"
# Show a progress bar over layers when converting at least this many (big models).
_PROGRESS_MIN_LAYERS = 32

# SALT layer type name -> (the base layer it replaces, its constructor from that layer,
# the name of its merge-back method). A new SALT layer kind is added here only.
_KINDS = {
    "SALTLinear": (nn.Linear, SALTLinear.from_linear, "to_linear"),
    "SALTConv2d": (nn.Conv2d, SALTConv2d.from_conv2d, "to_conv2d"),
}
SALT_MODULE_TYPES: tuple[type, ...] = (SALTLinear, SALTConv2d)
_BASE_TYPES: tuple[type, ...] = tuple(base for base, _, _ in _KINDS.values())


# --------------------------------------------------------------------------- helpers


def _is_salt(module: nn.Module) -> bool:
    return isinstance(module, SALT_MODULE_TYPES)


def _kind_of_base(module: nn.Module) -> str | None:
    """The SALT layer type that replaces ``module`` (an nn.Linear or nn.Conv2d)."""
    for kind, (base, _, _) in _KINDS.items():
        if type(module) is base or isinstance(module, base):
            return kind
    return None


def _io(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear / SALTLinear, channels of a Conv2d / SALTConv2d."""
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


def _layer_rank(weight: torch.Tensor, rank, energy) -> int:
    """The rank for one (D, K) weight: an int capped at min(D, K), a fraction of
    min(D, K) (rounded up, at least 1), or the smallest rank keeping ``energy`` of the
    squared spectrum (singular values in float32 on the weight's device)."""
    full = min(weight.shape)
    if energy is not None:
        s2 = torch.linalg.svdvals(weight.detach().to(torch.float32)).double() ** 2
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


def _make_salt_layer(module: nn.Module, spec: dict) -> nn.Module:
    """Build the SALT layer for ``module`` from a per-layer spec (the one place a
    layer is constructed, used by both ``apply_salt`` and ``load_salt``)."""
    if spec["type"] not in _KINDS:
        raise ValueError(f"unknown SALT layer type {spec['type']!r}, expected one of {sorted(_KINDS)}")
    base, convert, _ = _KINDS[spec["type"]]
    if not isinstance(module, base):
        raise TypeError(f"expected an nn.{base.__name__} to convert to {spec['type']}, got {type(module).__name__}")
    return convert(
        module, spec["rank"], spec["lora_rank"], scaling=spec["scaling"], svd=spec["svd"],
        **spec.get("kwargs", {}),
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
    """Replace matching ``nn.Linear`` layers of ``model`` in place by ``SALTLinear``.

    rank: an int (capped at each layer's ``min(in, out)``) or a float in (0, 1], the
        fraction of ``min(in, out)`` kept (rounded up). Alternative: ``energy``.
    energy: keep the smallest rank whose singular values retain this fraction of
        ``sum(sigma**2)`` (per layer).
    lora_rank: ``r'`` of the ``X (r, r')``, ``Y (r', r)`` update; capped at each layer's
        rank. 0 trains the singular values alone.
    target_modules: ``None`` / ``"all-linear"`` (every ``nn.Linear``), a regex matched
        against full module names, or a list of names matched exactly or as a dotted
        suffix (PEFT's rules). ``nn.Conv2d`` layers (``groups=1``) become ``SALTConv2d``
        when named by a regex or list; the default converts Linear layers only.
    freeze_base: freeze every parameter except SALT's ``sigma``, ``X``, ``Y`` (and the
        SALT biases when ``train_bias``, like PEFT's ``bias="lora_only"``).
    progress: progress bar over layers (default: on for 32 layers or more).
    layer_kwargs: passed to the layer constructor (``SALTLinear.from_linear``) and
        saved with the adapter; must be JSON-serialisable.

    SVDs run in float32 on each layer's device; layers keep their dtype. The options and
    per-layer ranks are recorded in ``model.salt_config`` for :func:`save_salt`.
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
        if kind == "SALTLinear" or (kind is not None and not every_linear):
            targets.append((first_name[id(module)], module, kind))
            seen.add(id(module))
        else:
            matched_other.append((name, module))
    if not targets:
        extra = ""
        if matched_other:
            kinds = ", ".join(f"{n} ({type(m).__name__})" for n, m in matched_other[:5])
            extra = f"; these names matched but are not nn.Linear / nn.Conv2d: {kinds}"
        raise ValueError(
            f"target_modules: {target_modules!r} matched no nn.Linear (or named nn.Conv2d) in the model{extra}"
        )

    config = getattr(model, _CONFIG_ATTR, None) or {"layers": {}}
    layers = config["layers"]
    for name, base, kind in _progress(targets, progress, "apply_salt"):
        # a conv kernel (out, in, kh, kw) is decomposed as the (out, in*kh*kw) matrix
        r = _layer_rank(base.weight.flatten(1), rank, energy)
        spec = {"type": kind, "rank": r, "lora_rank": min(int(lora_rank), r),
                "scaling": float(scaling), "svd": svd, "kwargs": layer_kwargs}
        layer = _make_salt_layer(base, spec)
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


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` element counts. ``total`` is every parameter, the frozen
    SALT bases (``U``, ``V``, a residual: frozen parameters) included, each tied or
    shared tensor once. ``sigma0`` (a buffer: the singular values at conversion, kept
    for the regulariser) is bookkeeping and not counted. On a model sharded by FSDP2
    the counts are of the full (unsharded) tensors."""
    _check_model(model)
    params = {id(p): p for p in model.parameters()}  # tied weights once
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: N || all params: M || trainable%: P`` (and return None,
    as PEFT does; :func:`trainable_parameters` returns the numbers)."""
    trainable, total = trainable_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")


@torch.no_grad()
def merge_salt(model: nn.Module) -> nn.Module:
    """Replace every SALT layer by a plain ``nn.Linear`` / ``nn.Conv2d`` holding its merged weight
    (merged in float32, cast once to the layer's dtype) and return ``model``.

    Like PEFT's ``merge_and_unload``, this modifies ``model`` in place and returns the
    same object: merge a ``copy.deepcopy(model)`` to keep the SALT model. The merged
    layers' parameters require grad as the SALT layer's ``sigma`` did; the rest of the
    model is untouched."""
    _check_model(model)
    if _is_salt(model):
        raise TypeError("model: merge_salt replaces layers inside a model; call .to_linear() on a bare SALT layer")
    salt_layers = [(n, m) for n, m in model.named_modules() if _is_salt(m)]
    if not salt_layers:
        raise ValueError("model: has no SALT layers to merge (apply_salt or load_salt converts a model)")
    if _sharding.is_sharded(model):
        raise ValueError(
            "model: merge_salt needs an unsharded model (it builds each dense weight); load the "
            "adapter into an unsharded copy of the base with load_salt and merge that"
        )
    for name, layer in salt_layers:
        merged = getattr(layer, _KINDS[type(layer).__name__][2])()
        trainable = any(p.requires_grad for p in layer.parameters())
        for p in merged.parameters():
            p.requires_grad_(trainable)
        _replace_module(model, name, merged)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


def _basis_check(U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of U: the row of its largest entry and that entry (float32)."""
    Uf = U.detach().float().cpu()
    idx = Uf.abs().argmax(dim=0)
    return idx, Uf[idx, torch.arange(Uf.shape[1])]


def _refuse_non_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(
            f"save_salt: parameter {name!r} holds NaN or inf (did training diverge?); "
            "nothing was written, the file at path is unchanged"
        )


def save_salt(model: nn.Module, path, *, include_basis: bool | None = None) -> dict:
    """Save the trained tensors and the conversion config of a SALT model to a
    safetensors file. Returns ``{"path", "file_bytes", "num_tensors", "num_elements"}``.

    include_basis: also store every SALT layer's frozen ``U``, ``V`` (a bigger file that
        does not depend on recomputing the SVD). Default: only for layers converted with
        ``svd="lowrank"``, whose randomised SVD is not reproducible.

    The write is atomic (temporary file in the same directory, fsync, rename): a crash
    leaves the old file or the new one, never a mix. The directory must exist.
    A model sharded by FSDP2 (``fully_shard``): call on every rank (the tensors are
    gathered, a collective); rank 0 writes one full file.
    """
    _check_model(model)
    if include_basis is not None and not isinstance(include_basis, bool):
        raise TypeError(f"include_basis: expected None or a bool, got {type(include_basis).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    salt_layers = {n: m for n, m in model.named_modules() if _is_salt(m)}
    if not salt_layers:
        raise ValueError("model: has no SALT layers; call apply_salt first")
    sharded, writes = _sharding.writer_rank(model)
    # a bad path fails on every rank before any collective work
    _sharding.share_outcome(sharded, writes, lambda: adapter_file.check_target(path))
    config = dict(getattr(model, _CONFIG_ATTR, None) or {})
    known = config.get("layers", {})
    layers = {}
    for name, layer in salt_layers.items():
        old = known.get(name, {})
        layers[name] = _layer_spec(name, layer, old.get("svd", "exact"), old.get("kwargs", {}))
    config.update(format=FORMAT_NAME, version=FORMAT_VERSION, layers=layers)

    # _sharding.full gathers a sharded tensor: every rank runs this same sequence, and
    # only the writing rank keeps the gathered copies (the others keep their shapes).
    # Copies: serialising goes through numpy, which pins a storage (FSDP2 must be able
    # to free a parameter's unsharded storage afterwards).
    def keep(t):
        if writes:
            return t.to("cpu", copy=True).contiguous()
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    tensors = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors[name] = keep(_sharding.full(p.detach()))
    for name, layer in salt_layers.items():
        store = include_basis if include_basis is not None else layers[name]["svd"] == "lowrank"
        layers[name]["basis_stored"] = bool(store)
        U = _sharding.full(layer.U.detach())
        if store:
            tensors[f"{name}.U"] = keep(U)
            tensors[f"{name}.V"] = keep(_sharding.full(layer.V.detach()))
        idx, val = _basis_check(U) if writes else (U[0].long(), U[0].float())
        tensors[f"{_CHECK_PREFIX}{name}.row"] = keep(idx)
        tensors[f"{_CHECK_PREFIX}{name}.value"] = keep(val)
        del U
    metadata = {"salt_config": json.dumps(config), "format": FORMAT_NAME}

    def write():
        for name, t in tensors.items():
            _refuse_non_finite(name, t)
        return adapter_file.write_adapter(path, tensors, metadata)

    file_bytes = _sharding.share_outcome(sharded, writes, write)
    return {
        "path": path,
        "file_bytes": file_bytes,
        "num_tensors": len(tensors),
        "num_elements": sum(t.numel() for t in tensors.values()),
    }


def read_salt_config(path) -> dict:
    """The conversion config stored in a file written by :func:`save_salt`. A file that
    is not a (valid) adapter raises :class:`~salt_kernels.AdapterFileError` naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    return adapter_file.read_config(path)


@torch.no_grad()
def _align_basis(name: str, layer: nn.Module, row: torch.Tensor, value: torch.Tensor, *,
                 caller: str = "load_salt", remedy: str = "save with include_basis=True") -> int:
    """Flip singular pairs of ``layer`` whose sign differs from the saved ones; refuse a
    basis that differs by more than a sign (the error names ``caller`` and suggests
    ``remedy``). Returns the number of flipped pairs."""
    U = _sharding.full(layer.U.detach()).float().cpu()
    cols = torch.arange(U.shape[1])
    now = U[row, cols]
    # The stored entry is the largest of a unit column (>= 1/sqrt(D)); the recomputed
    # one must match it in magnitude up to the layer dtype's rounding.
    tol = 2e-2 * value.abs() + 1e-4
    bad = ((now.abs() - value.abs()).abs() > tol).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"{caller}: layer {name!r}: the base model's singular vector {i} does not match the "
            f"adapter's (U[{int(row[i])}, {i}] = {now[i].item():.6g}, saved {value[i].item():.6g}). "
            "Is this the base model the adapter was trained on? If it is (e.g. nearly repeated "
            f"singular values), {remedy}."
        )
    flip = (torch.sign(now) != torch.sign(value)).nonzero().flatten()
    if flip.numel():
        # on the full tensors: a sharded U, V takes back its own shard
        for basis in (layer.U, layer.V):
            flipped = _sharding.full(basis).clone()
            flipped[:, flip.to(flipped.device)] *= -1
            _sharding.assign(basis, flipped)
    return int(flip.numel())


@torch.no_grad()
def load_salt(model: nn.Module, path, *, progress: bool | None = None, adapter_name: str | None = None) -> nn.Module:
    """Load a file written by :func:`save_salt` into ``model`` in place and return it.

    ``model`` is a fresh copy of the base model the adapter was trained on, either plain
    (its layers are converted from the stored config) or already converted with the same
    config. Afterwards exactly the saved trained tensors require grad.

    ``adapter_name``: load the file as a named adapter; a model that already has SALT
    layers keeps its adapters and gains this one (several adapters on one base, see
    :mod:`salt_kernels.adapters`).

    Every checksum is verified first: a malformed or corrupted file raises
    :class:`~salt_kernels.AdapterFileError` naming the path (and the first bad tensor)
    before the model is touched. A model sharded by FSDP2 must already be converted
    (``apply_salt`` before ``fully_shard``); call on every rank.
    """
    _check_model(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    if adapter_name is not None:
        from .adapters import load_adapter

        return load_adapter(model, path, adapter_name, progress=progress)
    config, tensors = adapter_file.read_adapter(path)
    layers = config["layers"]

    modules = dict(model.named_modules())
    to_convert = []
    for name, spec in layers.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"load_salt: the adapter has layer {name!r} but the model has no module of that name")
        if not _is_salt(module) and _kind_of_base(module) != spec["type"]:
            base = _KINDS.get(spec["type"], (nn.Module,))[0].__name__
            raise TypeError(
                f"load_salt: layer {name!r} is a {type(module).__name__}, expected nn.{base} or a {spec['type']}"
            )
        if _is_salt(module) and type(module).__name__ != spec["type"]:
            raise TypeError(f"load_salt: layer {name!r} is a {type(module).__name__}, the adapter has a {spec['type']}")
        expected = {k: spec[k] for k in _geometry(module) if k in spec}
        if _geometry(module) != expected:
            raise ValueError(
                f"load_salt: layer {name!r} ({type(module).__name__}) has {_geometry(module)} but the "
                f"adapter was saved with {expected}"
            )
        if _is_salt(module):
            for key in ("rank", "lora_rank"):
                if getattr(module, key) != spec[key]:
                    raise ValueError(
                        f"load_salt: layer {name!r} has {key}={getattr(module, key)} but the adapter "
                        f"was saved with {key}={spec[key]}"
                    )
        elif _sharding.is_sharded(module):
            raise ValueError(
                f"load_salt: layer {name!r} is sharded but not converted: a sharded model must be "
                "converted before sharding (apply_salt, then fully_shard, then load_salt)"
            )
        else:
            to_convert.append((name, module, spec))

    for name, module, spec in _progress(to_convert, progress, "load_salt"):
        _replace_module(model, name, _make_salt_layer(module, spec))

    for name, spec in layers.items():
        layer = model.get_submodule(name)
        if spec.get("basis_stored"):
            _sharding.assign(layer.U, tensors.pop(f"{name}.U"))
            _sharding.assign(layer.V, tensors.pop(f"{name}.V"))
            tensors.pop(f"{_CHECK_PREFIX}{name}.row")
            tensors.pop(f"{_CHECK_PREFIX}{name}.value")
        else:
            _align_basis(name, layer, tensors.pop(f"{_CHECK_PREFIX}{name}.row"),
                         tensors.pop(f"{_CHECK_PREFIX}{name}.value"))

    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise ValueError(f"load_salt: the adapter has tensors the model lacks: {missing[:5]}")
    for p in params.values():
        p.requires_grad_(False)
    for key, value in tensors.items():
        p = params[key]
        if tuple(p.shape) != tuple(value.shape):
            raise ValueError(f"load_salt: {key}: model has shape {tuple(p.shape)}, adapter {tuple(value.shape)}")
        _sharding.assign(p, value)
        p.requires_grad_(True)
    setattr(model, _CONFIG_ATTR, config)
    return model
