"""The ``triton`` backend: fused Triton kernels (CUDA; CPU tensors under
``TRITON_INTERPRET=1``, for tests).

* :mod:`.kernels`: the shrink / mix / expand kernels, their launch planning, and the
  plain forward and backward ops (autograd from :mod:`..autograd`).
* :mod:`.multi`: the mixed-adapter forward (the shared shrink, then an expand with the
  gathered per-adapter mix in its prologue). Inference only (no ``MULTI_BACKWARD``).

Importing it raises ImportError without Triton; the dispatcher then skips it.
"""

from __future__ import annotations

from .kernels import MAX_RANK, availability, salt_linear_2d
from .multi import MULTI_MAX_RANK, multi_linear_2d

__all__ = ["MAX_RANK", "MULTI_MAX_RANK", "availability", "multi_linear_2d", "salt_linear_2d"]
