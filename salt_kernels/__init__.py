"""salt_kernels: fast SALT (Singular value Adaptation with Low-rank Transformation).

    y = U_r (diag(sigma) + scaling * X @ Y) V_r^T x + b

computed without ever building the dense weight. See README.md and docs/design.md.
"""

from .dispatch import BackendUnavailableError, available_backends, salt_linear
from .adapter_file import AdapterFileError, AdapterFileWarning
from .conv import SALTConv2d
from .export import export_lora
from .layers import SALTLinear, truncated_svd
from .model import (
    apply_salt,
    load_salt,
    merge_salt,
    print_trainable_parameters,
    read_salt_config,
    save_salt,
    trainable_parameters,
)
from .regularizer import salt_regularizer
from .adapters import adapters, delete_adapter, list_adapters, set_adapter
from .warmup import warmup

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
    "__version__",
]
