"""The nn layers: drop-in modules computed by :func:`salt_kernels.salt_linear`.

* :mod:`.linear`: ``SALTLinear`` (and the parametrisation it shares with the conv layer),
  ``truncated_svd``.
* :mod:`.conv`: ``SALTConv2d``.
* :mod:`.conv1d`: ``SALTConv1D`` (transformers' ``Conv1D``, GPT-2: a transposed linear layer).
* :mod:`.quantized`: a frozen residual quantized by bitsandbytes (``quantize=``), and
  reading bitsandbytes' 4- and 8-bit layers.
* :mod:`.regularizer`: ``salt_regularizer``, the official SALT loss term.
* :mod:`.cudagraph`: ``warmup``, autotune and compile before CUDA-graph capture.
* :mod:`.sharding`: gathering and assigning FSDP2-sharded parameters.

Above the op (``salt_kernels.ops``), below the model-level helpers.
"""

from .conv import SALTConv2d
from .conv1d import SALTConv1D
from .linear import SALTAdapterMixin, SALTLinear, truncated_svd
from .regularizer import salt_regularizer
from .cudagraph import warmup

# Every SALT layer type (the model-level helpers find SALT layers by these; SALTConv1D is
# a SALTLinear).
SALT_MODULE_TYPES: tuple[type, ...] = (SALTLinear, SALTConv2d)

__all__ = ["SALT_MODULE_TYPES", "SALTAdapterMixin", "SALTConv1D", "SALTConv2d", "SALTLinear", "salt_regularizer",
           "truncated_svd", "warmup"]
