"""``SaltModel``: the PEFT tuner for SALT: which layers become :class:`~.layer.SaltLayer`,
default target modules, adapter dtypes, and mixed-adapter batches (``adapter_names=``)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial

from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, AuxiliaryTrainingWrapper

from .layer import SaltLayer, make_layer

PREFIX = "salt_"


def _adapter_names_pre_forward_hook(target, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _encoder(model: nn.Module):
    """The encoder of an encoder-decoder model (None otherwise): under beam search it sees
    the samples before they are repeated per beam."""
    get = getattr(model, "get_encoder", None)
    if get is None:
        return None
    encoder = get()
    return None if encoder is model else encoder


def _is_abstract(name: str) -> bool:
    return getattr(getattr(BaseTuner, name, None), "__isabstractmethod__", False) or not hasattr(BaseTuner, name)


class SaltModel(BaseTuner):
    """The PEFT tuner for SALT: replaces the targeted ``nn.Linear``, transformers ``Conv1D``
    and ``nn.Conv2d`` layers by SALT tuner layers."""

    prefix: str = PREFIX
    tuner_layer_cls = SaltLayer
    # LoRA's defaults per architecture: SALT adapts the same weight matrices.
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            target_modules = self.target_module_mapping.get(model_config.get("model_type"))
            if target_modules is None:
                raise ValueError("Please specify `target_modules` in `peft_config`")
            peft_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key=None, **kwargs):
        name = current_key or target_name
        if isinstance(target, SaltLayer):
            target.update_layer(adapter_name, peft_config, name)
            return
        new = make_layer(target, adapter_name, peft_config, name)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        setattr(parent, target_name, new)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's upcast of a half-precision adapter to float32, the shared basis included (it
        is what LoRA's A and B are to a SALT adapter: the adapter runs in its dtype)."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if isinstance(module, SaltLayer) and adapter_name in module.salt_core:
                module._salt_upcast_basis()

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``:
        sample i runs adapter ``adapter_names[i]`` (``"__base__"``: the base model), one call
        of the mixed-adapter op per layer. PEFT's checks and messages, as for LoRA."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        # Checked here, not per layer: a layer need not have every adapter, but a name no
        # layer has is a typo.
        expected = set()
        for layer in self.modules():
            if isinstance(layer, SaltLayer):
                expected |= set(layer.salt_core.keys())
        unexpected = {name for name in adapter_names if name != "__base__"} - expected
        if unexpected:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
        original = list(adapter_names)
        num_beams = kwargs.get("num_beams", None)
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats every sample per beam
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        targets = (SaltLayer, AuxiliaryTrainingWrapper)
        for module in self.modules():
            if isinstance(module, targets):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        encoder = _encoder(self.model)
        if encoder is not None and len(adapter_names) != len(original):
            for module in encoder.modules():
                if isinstance(module, targets):
                    hook = partial(_adapter_names_pre_forward_hook, adapter_names=original)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

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
