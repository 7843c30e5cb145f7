"""salt_kernels: fast SALT (Singular value Adaptation with Low-rank Transformation).

    y = U_r (diag(sigma) + scaling * X @ Y) V_r^T x + b

computed without ever building the dense weight. See README.md and DESIGN.md.
"""

from .dispatch import BackendUnavailableError, available_backends, salt_linear
from .layers import SALTLinear, truncated_svd

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "SALTLinear",
    "available_backends",
    "salt_linear",
    "truncated_svd",
    "__version__",
]
