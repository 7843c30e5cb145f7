"""Export a SALT model as a standard PEFT LoRA adapter for the *original* base model.

A SALT layer in residual mode computes ``W + U_r (C - Sigma0) V_r^T`` with
``C = diag(sigma') + s X Y``: the original weight plus an update of rank r, which is
exactly a LoRA update with ``B = U_r (C - Sigma0)`` (out x r) and ``A = V_r^T`` (r x in).
Full-rank SALT (r = min(in, out)) is the same with ``W = U Sigma0 V^T``. Truncated SALT
without the residual computes ``U_r C V_r^T``: it has dropped ``W - U_r Sigma0 V_r^T``, so
no rank-r LoRA on the original weight reproduces it, and :func:`export_lora` refuses it.

A quantized residual (``quantize=``) makes the SALT model's base ``U_r Sigma0 V_r^T +
Q(W - U_r Sigma0 V_r^T)`` rather than ``W``. The LoRA still applies to the weights the
model was converted from (the float weights, or a 4-bit model's dequantized ones) and
there reproduces the SALT model up to that base's error, ``||W - base|| / ||W||``, which
each layer measured at conversion (``base_error``) and :func:`export_lora` reports.

The files are what ``LoraConfig`` / ``PeftModel.save_pretrained`` write
(``adapter_config.json``, ``adapter_model.safetensors``), so any LoRA server (vLLM,
SGLang, LoRAX, TGI) or ``PeftModel.from_pretrained`` loads them; ``peft`` itself is not
needed to export.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..backends.core import accumulate_dtype
from ..nn import SALT_MODULE_TYPES, SALTLinear
from .adapter_file import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def lora_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = U (C - diag(sigma0)) V^T``: the update a SALT layer
    (a ``SALTLinear``) adds to the weight it was built from, in float32 (float64 for a
    float64 layer). ``B`` is (out, r), ``A`` is (r, in)."""
    acc = accumulate_dtype(layer.U.dtype)
    with torch.no_grad():
        core = layer.mix(acc) - torch.diag(layer.sigma0.to(acc))
        return layer.U.to(acc) @ core, layer.V.to(acc).t().contiguous()


def _salt_updates(model: nn.Module, adapter_name):
    """(name in the original model, SALT core, residual?, fan_in_fan_out?) for every SALT
    layer of an ``apply_salt`` model or of a PEFT model built with ``SaltConfig``
    (``fan_in_fan_out``: the base layer is a transformers Conv1D, GPT-2's)."""
    found = []
    for name, module in model.named_modules():
        cores = getattr(module, "salt_core", None)
        if isinstance(cores, nn.ModuleDict) and hasattr(module, "base_layer"):  # PEFT layer
            if module.merged:
                raise ValueError(f"export_lora: layer {name!r} is merged; call unmerge_adapter() first")
            names = [adapter_name] if adapter_name is not None else [a for a in module.active_adapters if a in cores]
            names = [a for a in names if a in cores]
            if not names:  # the adapter does not target this layer: it is unchanged
                continue
            if len(names) > 1:
                raise ValueError(
                    f"export_lora: layer {name!r} has adapters {sorted(cores)} (active: {module.active_adapters}); "
                    "pass adapter_name= to choose exactly one"
                )
            if isinstance(module.get_base_layer(), nn.Conv2d):
                raise TypeError(f"export_lora: layer {name!r} adapts an nn.Conv2d; only linear layers (nn.Linear, "
                                "Conv1D) export to LoRA")
            orig = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
            found.append((orig, cores[names[0]], module.salt_residual[names[0]], module.fan_in_fan_out))
        elif isinstance(module, SALT_MODULE_TYPES) and not _inside_peft_layer(model, name):
            if not isinstance(module, SALTLinear):
                raise TypeError(f"export_lora: layer {name!r} is a {type(module).__name__}; only SALTLinear layers export to LoRA")
            found.append((name, module, module.residual, getattr(module, "fan_in_fan_out", False)))
    return found


def _inside_peft_layer(model: nn.Module, name: str) -> bool:
    """True for the ``salt_core.<adapter>`` SALTLinear held by a PEFT layer."""
    return ".salt_core." in f".{name}"


def _check_bias_untrained(model: nn.Module) -> None:
    config = getattr(model, "salt_config", None) or {}
    if config.get("train_bias"):
        raise ValueError(
            "export_lora: the model was converted with train_bias=True; a LoRA adapter carries no "
            "bias, so the trained biases would be lost. Serve the merged model (merge_salt) instead."
        )


def _base_name(model: nn.Module):
    for obj in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        cfg = getattr(obj, "config", None)
        path = getattr(cfg, "_name_or_path", None) or getattr(obj, "name_or_path", None)
        if isinstance(path, str) and path:
            return path
    return None


def export_lora(
    model: nn.Module,
    save_directory,
    *,
    adapter_name: str | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """Write the SALT layers of ``model`` as a standard PEFT LoRA adapter for the original
    base model (``adapter_config.json`` + ``adapter_model.safetensors`` in ``save_directory``).

    model: an ``apply_salt`` model, or a PEFT model built with ``SaltConfig``
        (``adapter_name`` picks one of several adapters; default: the active one).
    Each layer's update ``U_r (C - Sigma0) V_r^T`` is written as ``lora_B = U_r (C - Sigma0)``,
    ``lora_A = V_r^T`` at rank ``r`` = the largest SALT rank in the model (smaller layers are
    zero-padded, so one ``r`` and ``lora_alpha = r``, i.e. LoRA scaling 1, hold for every
    layer and any LoRA server reads the file). Layers must use ``residual=True`` or be full
    rank. dtype: of the written tensors (default: each layer's).

    Returns ``{"path", "rank", "num_layers", "file_bytes", "base_error"}``: ``base_error``
    is the largest ``||W - base|| / ||W||`` over the layers with a quantized residual,
    i.e. how far the LoRA applied to the converted-from weights ``W`` is from the SALT
    model (``None`` without quantized residuals, where it is exact up to rounding).
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected None or a floating torch.dtype, got {dtype!r}")
    _check_bias_untrained(model)
    updates = _salt_updates(model, adapter_name)
    if not updates and adapter_name is not None:
        raise ValueError(f"adapter_name: no SALT layer of the model has an adapter named {adapter_name!r}")
    if not updates:
        raise ValueError("model: has no SALT layers (apply_salt or get_peft_model with SaltConfig first)")
    for name, layer, residual, _ in updates:
        full = min(layer.in_features, layer.out_features)
        if not residual and layer.rank < full:
            raise ValueError(
                f"export_lora: layer {name!r} is truncated SALT (rank {layer.rank} < min(in, out) = {full}, "
                f"residual=False). It computes U_r C V_r^T and has dropped the original weight's remainder "
                f"W - U_r Sigma0 V_r^T, so it differs from the original weight by a matrix of rank up to {full}: "
                f"no rank-{layer.rank} LoRA on the original base model reproduces it. Train with residual=True "
                "(the export is then exact at the SALT rank), convert at full rank (rank=1.0), or serve the "
                "merged model (merge_salt / merge_and_unload) instead."
            )

    rank = max(layer.rank for _, layer, _, _ in updates)
    tensors = {}
    for name, layer, _, _ in updates:
        B, A = lora_factors(layer)
        out_dtype = dtype or layer.U.dtype
        pad = rank - layer.rank
        if pad:  # zero columns of B / rows of A leave B @ A unchanged
            B = torch.nn.functional.pad(B, (0, pad))
            A = torch.nn.functional.pad(A, (0, 0, 0, pad))
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A.to(out_dtype).contiguous().cpu()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B.to(out_dtype).contiguous().cpu()

    peft_config = getattr(model, "peft_config", None)
    task_type = None
    if isinstance(peft_config, dict) and peft_config:
        task_type = getattr(next(iter(peft_config.values())), "task_type", None)
    config = {
        "peft_type": "LORA",
        "task_type": getattr(task_type, "value", task_type),
        "base_model_name_or_path": base_model_name_or_path or _base_name(model),
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(name for name, _, _, _ in updates),
        "bias": "none",
        # a GPT-2 Conv1D's weight is (in, out); lora_A, lora_B are the same either way
        "fan_in_fan_out": all(conv1d for _, _, _, conv1d in updates),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    directory = os.fspath(save_directory)
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, WEIGHTS_NAME)
    atomic_write(weights, lambda p: save_file(tensors, p, metadata={"format": "pt"}))

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    atomic_write(os.path.join(directory, CONFIG_NAME), write_config)
    errors = [layer.base_error for _, layer, _, _ in updates if getattr(layer, "quantized_residual", None) is not None]
    return {"path": directory, "rank": rank, "num_layers": len(updates), "file_bytes": os.path.getsize(weights),
            "base_error": max((e for e in errors if e is not None), default=None)}
