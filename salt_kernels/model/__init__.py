"""Model-level helpers, in the style of PEFT: they work on whole models made of the nn
layers (``salt_kernels.nn``).

* :mod:`.convert`: ``apply_salt`` (convert target layers in place), ``merge_salt``.
* :mod:`.counting`: ``trainable_parameters``, ``print_trainable_parameters``.
* :mod:`.checkpoint`: ``save_salt`` / ``load_salt`` / ``read_salt_config``: only the
  trained tensors and the conversion config.
* :mod:`.basis`: the basis check that ties an adapter to its base (SVD signs).
* :mod:`.bank`: many adapters on one base: named adapters and mixed batches.
* :mod:`.adapter_file`: the file itself: atomic writes, checksums, one error type.
* :mod:`.export`: ``export_lora``, a SALT model as a standard PEFT LoRA adapter.

The PEFT tuner (``salt_kernels.peft``) sits beside this package, at the same level.
"""

from .adapter_file import AdapterFileError, AdapterFileWarning
from .bank import adapters, delete_adapter, list_adapters, set_adapter
from .checkpoint import load_salt, read_salt_config, save_salt
from .convert import apply_salt, merge_salt
from .counting import print_trainable_parameters, trainable_parameters
from .export import export_lora

__all__ = ["AdapterFileError", "AdapterFileWarning", "adapters", "apply_salt", "delete_adapter", "export_lora",
           "list_adapters", "load_salt", "merge_salt", "print_trainable_parameters", "read_salt_config",
           "save_salt", "set_adapter", "trainable_parameters"]
