"""Many adapters on one base model: an adapter bank per SALT layer, named adapters, and
mixed-adapter batches.

    model = load_salt(base, "math.safetensors", adapter_name="math")   # converts the base
    load_salt(model, "code.safetensors", adapter_name="code")          # adds a second adapter
    list_adapters(model)                      # ['math', 'code']
    set_adapter(model, "code")                # the active adapter: what model(x) runs,
                                              # trains, saves (save_salt) and merges
    with adapters(model, ["math", "code", None, "math"]):
        out = model(**batch)                  # row i of the batch uses adapter names[i]

Bank layout: every SALT layer keeps its parameters (``sigma`` or ``alpha``/``beta``,
``X``, ``Y``, ``bias``) as the *active* adapter, so existing code, optimizers, state
dicts and checkpoints are unchanged. The bank of all its adapters (the active one
included) lives in non-persistent buffers ``salt_bank_<param>`` of shape
``(A, *param.shape)`` (they follow ``.to()``, are not in ``state_dict``), with the
names in ``layer.salt_bank_names``; ``bias`` is banked only once an adapter file
carries its own bias. :func:`set_adapter` writes the active parameters back into the
bank before switching, so training the active adapter and switching never loses work.

On a PEFT model built with ``salt_kernels.peft.SaltConfig``, :func:`adapters` passes the
names to PEFT's own ``adapter_names=`` (``None`` becomes ``"__base__"``); the layers run
the same mixed-adapter op.

Mixed batches: :func:`adapters` takes one name per sample of the batch, i.e. per entry
of the first dimension of every SALT layer's input, broadcast over the other leading
dimensions (the tokens of a sequence). A layer whose input is already flattened to
``(batch * tokens, features)`` is matched by its row count instead: names per sample
are repeated over the rows of each sample when the row count is a multiple of the
number of names. ``None`` selects the base layer: ``U diag(sigma0) V^T`` (the
pretrained singular values; with ``residual=True`` plus the residual, i.e. the
pretrained layer) and, with a banked bias, the bias the layer had when its bank was
created. Nothing in the model's ``forward`` signature changes, so it works with any
Hugging Face model.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..nn import SALT_MODULE_TYPES, SALTLinear
from ..ops import salt_linear_multi
from . import adapter_file
from .basis import CHECK_PREFIX, basis_signs

_BANK = "salt_bank_"
_DEFAULT_NAME = "default"


# --------------------------------------------------------------------------- one layer


def _salt_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SALT_MODULE_TYPES)]


def _core_names(layer) -> list[str]:
    """The per-adapter parameters of a SALT layer, in bank order."""
    return (["sigma"] if layer.sigma_mode == "direct" else ["alpha", "beta"]) + ["X", "Y"]


def _banked_names(layer) -> list[str]:
    return _core_names(layer) + (["bias"] if getattr(layer, _BANK + "bias", None) is not None else [])


def active_adapter(layer) -> str:
    return getattr(layer, "active_adapter_name", _DEFAULT_NAME)


def _ensure_bank(layer) -> None:
    """Create the bank from the layer's parameters (one adapter, the active one)."""
    if getattr(layer, "salt_bank_names", None) is not None:
        return
    for pname in _core_names(layer):
        layer.register_buffer(_BANK + pname, getattr(layer, pname).detach().clone()[None], persistent=False)
    layer.register_buffer(_BANK + "bias", None, persistent=False)
    # the bias of base (-1) rows once biases are banked: the layer's bias as of now
    layer.register_buffer("salt_base_bias", None if layer.bias is None else layer.bias.detach().clone(),
                          persistent=False)
    layer.salt_bank_names = [active_adapter(layer)]


@torch.no_grad()
def _store_active(layer) -> None:
    """Write the active adapter's parameters into its bank row."""
    row = layer.salt_bank_names.index(active_adapter(layer))
    for pname in _banked_names(layer):
        getattr(layer, _BANK + pname)[row].copy_(getattr(layer, pname))


@torch.no_grad()
def add_layer_adapter(layer, name: str, tensors: dict) -> None:
    """Add adapter ``name`` to one SALT layer's bank from ``tensors`` (parameter name ->
    tensor; the core parameters are required, ``bias`` optional)."""
    _ensure_bank(layer)
    if name in layer.salt_bank_names:
        raise ValueError(f"adapter_name: {name!r} is already loaded (adapters: {layer.salt_bank_names})")
    missing = [p for p in _core_names(layer) if p not in tensors]
    if missing:
        raise ValueError(f"adapter {name!r}: missing tensors {missing} for a layer with sigma_mode="
                         f"{layer.sigma_mode!r}")
    if "bias" in tensors and layer.bias is None:
        raise ValueError(f"adapter {name!r}: has a bias but the layer has none")
    if "bias" in tensors and getattr(layer, _BANK + "bias") is None:
        _store_active(layer)
        A = len(layer.salt_bank_names)
        bank = layer.salt_base_bias[None].repeat(A, 1)
        bank[layer.salt_bank_names.index(active_adapter(layer))] = layer.bias
        setattr(layer, _BANK + "bias", bank)
    for pname in _banked_names(layer):
        bank = getattr(layer, _BANK + pname)
        value = tensors.get(pname, layer.salt_base_bias if pname == "bias" else None)
        if tuple(value.shape) != tuple(bank.shape[1:]):
            raise ValueError(f"adapter {name!r}: {pname} has shape {tuple(value.shape)}, the layer "
                             f"expects {tuple(bank.shape[1:])}")
        setattr(layer, _BANK + pname, torch.cat([bank, value.to(bank)[None]]))
    layer.salt_bank_names.append(name)


@torch.no_grad()
def set_layer_adapter(layer, name: str) -> None:
    names = getattr(layer, "salt_bank_names", None) or [active_adapter(layer)]
    if name not in names:
        raise ValueError(f"adapter_name: {name!r} is not loaded; adapters: {names}")
    if name == active_adapter(layer):
        return
    _store_active(layer)
    row = names.index(name)
    for pname in _banked_names(layer):
        getattr(layer, pname).copy_(getattr(layer, _BANK + pname)[row])
    layer.active_adapter_name = name


def _delete_layer_adapter(layer, name: str) -> None:
    keep = [i for i, n in enumerate(layer.salt_bank_names) if n != name]
    idx = torch.tensor(keep, device=layer.U.device)
    for pname in _banked_names(layer):
        setattr(layer, _BANK + pname, getattr(layer, _BANK + pname).index_select(0, idx))
    layer.salt_bank_names = [layer.salt_bank_names[i] for i in keep]


def _bank_tensors(layer) -> dict:
    """The bank as the op takes it: sigma' (A, r), X, Y, bias (A, D) or the shared one. The
    active adapter's row comes from the live parameters: in place without autograd
    (serving: no copy of the bank), spliced out of place when gradients may flow (so the
    active adapter trains on its rows of a mixed batch)."""
    row = layer.salt_bank_names.index(active_adapter(layer))
    live = {p: getattr(layer, p) for p in _banked_names(layer)}
    bank = {}
    for pname, value in live.items():
        stored = getattr(layer, _BANK + pname)
        if torch.is_grad_enabled():
            stored = stored.index_copy(0, torch.tensor([row], device=stored.device), value[None].to(stored.dtype))
        else:
            stored[row].copy_(value)
        bank[pname] = stored
    if layer.sigma_mode == "direct":
        sigma = bank["sigma"]
    else:
        sigma = torch.relu(torch.addcmul(bank["beta"], bank["alpha"], layer.sigma0.to(bank["alpha"].dtype)))
    return {"sigma": layer.op_sigma(sigma), "X": bank["X"], "Y": bank["Y"], "bias": bank.get("bias", layer.bias)}


# --------------------------------------------------------------------------- mixed batches


class _MixedRows:
    """Per-sample adapter names of one :func:`adapters` block, turned into the op's row
    index for each SALT layer it reaches (cached by device, bank order and input shape)."""

    def __init__(self, names: list):
        self.names = names
        self._cache: dict = {}

    def index(self, layer, x: torch.Tensor) -> torch.Tensor:
        lead = tuple(x.shape[:-1])
        key = (x.device, tuple(layer.salt_bank_names), lead)
        idx = self._cache.get(key)
        if idx is None:
            pos = {n: i for i, n in enumerate(layer.salt_bank_names)}
            unknown = sorted({n for n in self.names if n is not None and n not in pos})
            if unknown:
                raise ValueError(f"adapters: unknown adapter names {unknown}; loaded: {layer.salt_bank_names}")
            per_sample = torch.tensor([-1 if n is None else pos[n] for n in self.names], dtype=torch.int64)
            n, rows = len(self.names), int(torch.Size(lead).numel())
            if lead and lead[0] == n:
                idx = per_sample.view(n, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
            elif n and rows % n == 0:
                idx = per_sample.repeat_interleave(rows // n)
            else:
                raise ValueError(f"adapters: {n} names do not match a layer input of shape {tuple(x.shape)}: "
                                 "expected one name per sample (first dimension)")
            idx = idx.to(x.device)
            self._cache[key] = idx
        return idx

    def op(self, layer, x):
        """(sigma, X, Y, bias) and the op running them for ``layer`` on input ``x``."""
        bank = _bank_tensors(layer)
        base_bias = layer.salt_base_bias if bank["bias"] is not None and bank["bias"].dim() == 2 else None
        # base rows: sigma0, i.e. the base layer (op_sigma: zero where the quantized weight is the whole base)
        op = functools.partial(salt_linear_multi, adapter_index=self.index(layer, x),
                               base_sigma=layer.op_sigma(layer.sigma0), base_bias=base_bias,
                               check_range=False)  # built from checked names
        return (bank["sigma"], bank["X"], bank["Y"], bank["bias"]), op


@contextlib.contextmanager
def adapters(model: nn.Module, names):
    """Run ``model`` on a mixed batch inside this block: sample ``i`` of every SALT layer's
    input uses adapter ``names[i]`` (``None``: the base model). See the module docstring
    for how names map to rows."""
    if isinstance(names, str) or not hasattr(names, "__len__"):
        raise TypeError(f"names: expected a sequence of adapter names (str or None), one per sample, "
                        f"got {type(names).__name__}")
    names = list(names)
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"names: expected adapter names (str) or None, got {bad[:3]}")
    if _has_peft_salt_layers(model):
        with _peft_mixed_batch(model, names):
            yield model
        return
    layers = _salt_layers(model)
    if not layers:
        raise ValueError("model: has no SALT layers; call apply_salt or load_salt first")
    other = [n for n, m in layers if not isinstance(m, SALTLinear)]
    if other:
        raise TypeError(f"adapters: mixed batches run on SALTLinear layers only; the model has {other[:3]}")
    known = list_adapters(model)
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"names: unknown adapters {unknown}; loaded: {known}")
    rows = _MixedRows(names)
    previous = []
    for _, layer in layers:
        _ensure_bank(layer)
        previous.append(getattr(layer, "salt_rows", None))
        layer.salt_rows = rows
    try:
        yield model
    finally:
        for (_, layer), prev in zip(layers, previous):
            layer.salt_rows = prev


def _has_peft_salt_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds SALT layers of ``salt_kernels.peft`` (PEFT tuner layers)."""
    return isinstance(model, nn.Module) and any(
        isinstance(getattr(m, "salt_core", None), nn.ModuleDict) and hasattr(m, "base_layer") for m in model.modules())


def _peft_mixed_batch(model: nn.Module, names: list):
    """A SALT PeftModel runs mixed batches itself (``adapter_names=``, the same op): the
    block passes the names to every layer the way PEFT's forward does."""
    hooks = getattr(model, "_enable_peft_forward_hooks", None)
    if hooks is None:
        raise TypeError(
            f"adapters: {type(model).__name__} holds PEFT SALT layers but is not the PeftModel (or its "
            "base_model): call adapters() on the PeftModel, or pass adapter_names=[...] to its forward / generate "
            "('__base__' for the base model)"
        )
    return hooks(adapter_names=["__base__" if n is None else n for n in names])


# --------------------------------------------------------------------------- model level


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters loaded in ``model``, in bank order."""
    layers = _salt_layers(model)
    if not layers:
        return []
    layer = layers[0][1]
    return list(getattr(layer, "salt_bank_names", None) or [active_adapter(layer)])


def get_active_adapter(model: nn.Module) -> str:
    layers = _salt_layers(model)
    if not layers:
        raise ValueError("model: has no SALT layers")
    return active_adapter(layers[0][1])


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make ``name`` the active adapter of every SALT layer: the one ``model(x)`` runs,
    training updates, :func:`~salt_kernels.save_salt` saves and
    :func:`~salt_kernels.merge_salt` merges."""
    for _, layer in _salt_layers(model):
        set_layer_adapter(layer, name)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every SALT layer's bank (not the active one)."""
    known = list_adapters(model)
    if name not in known:
        raise ValueError(f"adapter_name: {name!r} is not loaded; adapters: {known}")
    if name == get_active_adapter(model):
        raise ValueError(f"adapter_name: {name!r} is the active adapter; set_adapter to another first")
    for _, layer in _salt_layers(model):
        _delete_layer_adapter(layer, name)
    return model


@torch.no_grad()
def load_adapter(model: nn.Module, path, adapter_name: str) -> nn.Module:
    """Add the adapter in ``path`` to the bank of every SALT layer of ``model`` (which has
    SALT layers: ``load_salt(model, path, adapter_name=...)`` converts a plain base
    first) under ``adapter_name``; the active adapter is unchanged. All adapters must have
    been trained on the same base with the same layers, ranks, scaling and sigma_mode."""
    layers = dict(_salt_layers(model))
    if adapter_name in list_adapters(model):
        raise ValueError(f"adapter_name: {adapter_name!r} is already loaded ({list_adapters(model)})")
    config, tensors = adapter_file.read_adapter(path)  # checksums verified: AdapterFileError names the path
    if set(config["layers"]) != set(layers):
        raise ValueError(f"load_salt: the adapter's SALT layers differ from the model's (adapter only: "
                         f"{sorted(set(config['layers']) - set(layers))[:3]}, model only: "
                         f"{sorted(set(layers) - set(config['layers']))[:3]})")
    per_layer = {}
    for name, spec in config["layers"].items():
        layer = layers[name]
        mode = spec.get("kwargs", {}).get("sigma_mode", "direct")
        for key, have, want in (("rank", layer.rank, spec["rank"]), ("lora_rank", layer.lora_rank, spec["lora_rank"]),
                                ("scaling", layer.scaling, spec["scaling"]), ("sigma_mode", layer.sigma_mode, mode)):
            if have != want:
                raise ValueError(f"load_salt: layer {name!r} has {key}={have!r}, the adapter {key}={want!r}; "
                                 "adapters in one bank must share it")
        signs = basis_signs(name, layer, spec, tensors)
        own = {p: tensors.pop(f"{name}.{p}") for p in (*_core_names(layer), "bias") if f"{name}.{p}" in tensors}
        if "X" in own:
            own["X"] = own["X"] * signs[:, None].to(own["X"].dtype)  # C -> S C S
            own["Y"] = own["Y"] * signs[None, :].to(own["Y"].dtype)
        per_layer[name] = {k: v.to(layers[name].U.device) for k, v in own.items()}
        for key in (f"{name}.U", f"{name}.V", f"{CHECK_PREFIX}{name}.row", f"{CHECK_PREFIX}{name}.value"):
            tensors.pop(key, None)
    if tensors:
        raise ValueError(f"load_salt: the adapter has trained tensors outside its SALT layers ({sorted(tensors)[:3]}); "
                         "a mixed batch cannot bank those: load it as the only adapter instead")
    for name, own in per_layer.items():
        add_layer_adapter(layers[name], adapter_name, own)
    return model
