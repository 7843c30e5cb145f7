"""salt_kernels: fast SALT (Singular value Adaptation with Low-rank Transformation).

    y = U_r (diag(sigma) + scaling * X @ Y) V_r^T x + b

computed without ever building the dense weight. See README.md and docs/design.md.

The package is layered (docs/design.md, "Architecture"); imports flow one way:
``backends`` -> ``ops`` -> ``nn`` -> ``model``, ``peft``; ``tools`` use the library.
This module only re-exports the public API.
"""

from .model import (
    AdapterFileError,
    AdapterFileWarning,
    adapters,
    apply_salt,
    delete_adapter,
    export_lora,
    list_adapters,
    load_salt,
    merge_salt,
    print_trainable_parameters,
    read_salt_config,
    save_salt,
    set_adapter,
    trainable_parameters,
)
from .nn import SALTConv2d, SALTLinear, salt_regularizer, truncated_svd, warmup
from .ops import BackendUnavailableError, available_backends, salt_linear, why_unavailable

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "AdapterFileWarning",
    "BackendUnavailableError",
    "SALTConv2d",
    "SALTLinear",
    "adapters",
    "delete_adapter",
    "list_adapters",
    "set_adapter",
    "apply_salt",
    "available_backends",
    "export_lora",
    "load_salt",
    "merge_salt",
    "print_trainable_parameters",
    "read_salt_config",
    "save_salt",
    "trainable_parameters",
    "salt_linear",
    "salt_regularizer",
    "truncated_svd",
    "warmup",
    "why_unavailable",
    "__version__",
]
