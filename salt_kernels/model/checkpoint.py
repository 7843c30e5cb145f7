"""Save and load only what trains: a SALT model's trained tensors and its conversion
config in one safetensors file.

    save_salt(model, "adapter.safetensors")               # trained tensors + conversion config
    fresh = load_salt(fresh_base, "adapter.safetensors")  # plain or pre-converted base
    load_salt(model, "code.safetensors", adapter_name="code")  # a second adapter (:mod:`.bank`)

File format (safetensors):

* tensors: every parameter that requires grad, under its name in the model (the SALT
  ``sigma``/``X``/``Y`` and anything else the user unfroze, e.g. a task head); with
  ``include_basis=True`` also each SALT layer's frozen ``U`` and ``V``; and per SALT
  layer a tiny *basis check* (:mod:`.basis`: ``r`` row indices and the entries of ``U``
  there) that ``load_salt`` uses to undo SVD sign flips and to refuse a base model that
  is not the one the adapter was trained on.
* metadata ``"salt_config"``: JSON with the conversion options and, per converted
  layer, its type, sizes, rank, lora_rank, scaling, svd method and any extra
  constructor options, so that a plain base can be converted again on load.
* metadata ``"salt_checksum"``: SHA-256 digests of every tensor and of the config,
  verified on load (:mod:`.adapter_file`: atomic writes, integrity).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..nn import sharding
from . import adapter_file, bank
from .adapter_file import FORMAT_NAME, FORMAT_VERSION
from .basis import CHECK_PREFIX, align_basis, basis_check
from ..nn.linear import residual_format_for
from ..nn.quantized import QuantFormat
from .convert import (_CONFIG_ATTR, _KINDS, _check_model, _geometry, _is_salt, _kind_of_base, _layer_spec,
                      _make_salt_layer, _progress, _replace_module, model_dtype, residual_format)


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
    sharded, writes = sharding.writer_rank(model)
    # a bad path fails on every rank before any collective work
    sharding.share_outcome(sharded, writes, lambda: adapter_file.check_target(path))
    config = dict(getattr(model, _CONFIG_ATTR, None) or {})
    known = config.get("layers", {})
    layers = {}
    for name, layer in salt_layers.items():
        old = known.get(name, {})
        layers[name] = _layer_spec(name, layer, old.get("svd", "exact"), old.get("kwargs", {}))
    config.update(format=FORMAT_NAME, version=FORMAT_VERSION, layers=layers)

    # sharding.full gathers a sharded tensor: every rank runs this same sequence, and
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
            tensors[name] = keep(sharding.full(p.detach()))
    for name, layer in salt_layers.items():
        store = include_basis if include_basis is not None else layers[name]["svd"] == "lowrank"
        layers[name]["basis_stored"] = bool(store)
        U = sharding.full(layer.U.detach())
        if store:
            tensors[f"{name}.U"] = keep(U)
            tensors[f"{name}.V"] = keep(sharding.full(layer.V.detach()))
        idx, val = basis_check(U) if writes else (U[0].long(), U[0].float())
        tensors[f"{CHECK_PREFIX}{name}.row"] = keep(idx)
        tensors[f"{CHECK_PREFIX}{name}.value"] = keep(val)
        del U
    metadata = {"salt_config": json.dumps(config), "format": FORMAT_NAME}

    def write():
        for name, t in tensors.items():
            _refuse_non_finite(name, t)
        return adapter_file.write_adapter(path, tensors, metadata)

    file_bytes = sharding.share_outcome(sharded, writes, write)
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
def load_salt(model: nn.Module, path, *, progress: bool | None = None, adapter_name: str | None = None) -> nn.Module:
    """Load a file written by :func:`save_salt` into ``model`` in place and return it.

    ``model`` is a fresh copy of the base model the adapter was trained on, either plain
    (its layers are converted from the stored config) or already converted with the same
    config. Afterwards exactly the saved trained tensors require grad.

    ``adapter_name``: load the file as a named adapter; a model that already has SALT
    layers keeps its adapters and gains this one (several adapters on one base, see
    :mod:`salt_kernels.model.bank`).

    Every checksum is verified first: a malformed or corrupted file raises
    :class:`~salt_kernels.AdapterFileError` naming the path (and the first bad tensor)
    before the model is touched. A model sharded by FSDP2 must already be converted
    (``apply_salt`` before ``fully_shard``); call on every rank.
    """
    _check_model(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    if adapter_name is not None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"adapter_name: expected a non-empty str, got {adapter_name!r}")
        if any(_is_salt(m) for m in model.modules()):
            return bank.load_adapter(model, path, adapter_name)
        _load(model, path, progress)  # a plain base: converted, with this adapter as the active one
        for m in model.modules():
            if _is_salt(m):
                m.active_adapter_name = adapter_name
        return model
    return _load(model, path, progress)


def _check_residual_format(name: str, module: nn.Module, spec: dict) -> None:
    """The layer's residual (once converted) is stored as it was when the adapter was
    trained: a 4-bit residual and a dense one are different bases."""
    if "residual_format" not in spec:  # (a file from before quantized residuals)
        return
    if _is_salt(module):
        have = residual_format(module)
    elif spec["type"] == "SALTLinear":
        kw = spec.get("kwargs", {})
        fmt, keeps_base = residual_format_for(module, kw.get("residual", False), kw.get("quantize"),
                                              kw.get("quantize_blocksize"), kw.get("quantize_double"),
                                              kw.get("quantize_iters", 1))
        have = None if fmt is None else {**vars(fmt), "quantized_base": keeps_base}
    else:
        have = None
    want = spec["residual_format"]
    if have != want:
        def say(f):
            if f is None:
                return "a dense (or no) residual"
            what = "base" if f.get("quantized_base") else "residual"
            return f"a {QuantFormat(f['quant_type'], f['blocksize'], f['double_quant']).describe()} {what}"
        raise ValueError(
            f"load_salt: layer {name!r}: the adapter was trained on {say(want)}, this model's layer gives "
            f"{say(have)}; load it onto the base it was trained on (e.g. the same model loaded in 4 bits)"
        )


def _load(model: nn.Module, path, progress) -> nn.Module:
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
        elif sharding.is_sharded(module):
            raise ValueError(
                f"load_salt: layer {name!r} is sharded but not converted: a sharded model must be "
                "converted before sharding (apply_salt, then fully_shard, then load_salt)"
            )
        else:
            to_convert.append((name, module, spec))
        _check_residual_format(name, module, spec)

    dtype = model_dtype(model)
    for name, module, spec in _progress(to_convert, progress, "load_salt"):
        _replace_module(model, name, _make_salt_layer(module, spec, dtype))

    for name, spec in layers.items():
        layer = model.get_submodule(name)
        if spec.get("basis_stored"):
            sharding.assign(layer.U, tensors.pop(f"{name}.U"))
            sharding.assign(layer.V, tensors.pop(f"{name}.V"))
            tensors.pop(f"{CHECK_PREFIX}{name}.row")
            tensors.pop(f"{CHECK_PREFIX}{name}.value")
        else:
            align_basis(name, layer, tensors.pop(f"{CHECK_PREFIX}{name}.row"),
                         tensors.pop(f"{CHECK_PREFIX}{name}.value"))

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
        sharding.assign(p, value)
        p.requires_grad_(True)
    setattr(model, _CONFIG_ATTR, config)
    return model
