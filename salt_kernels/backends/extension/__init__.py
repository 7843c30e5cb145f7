"""The ``cpu`` and ``cuda`` backends: the compiled torch extension ``salt_kernels._C``.

* :mod:`.ops`: the plain op (``salt_kernels::salt_forward`` / ``salt_backward``), its
  fake kernels; autograd is registered in C++.
* :mod:`.multi`: the mixed-adapter op (``salt_multi_forward`` / ``salt_multi_backward``),
  its fake kernels and autograd (gradients for x, the bank and the biases; U, V frozen).

Importing this package raises ImportError when the extension was not built or fails to
load; the dispatcher then skips the backend with one warning. An extension built
without the mixed-adapter ops still serves plain calls.
"""

from __future__ import annotations

from .ops import availability, cpu_gemm_dtype, has_kernel, salt_linear_2d

__all__ = ["availability", "cpu_gemm_dtype", "has_kernel", "salt_linear_2d"]

try:
    from .multi import multi_linear_2d
except ImportError as exc:  # an extension built before the mixed-adapter ops
    MULTI_MISSING = str(exc)
else:
    MULTI_BACKWARD = True
    __all__ += ["MULTI_BACKWARD", "multi_linear_2d"]
