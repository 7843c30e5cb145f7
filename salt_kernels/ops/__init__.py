"""The op layer: :func:`salt_linear` and the one place that chooses its backend.

* :mod:`.linear`: ``salt_linear`` (plain and mixed-adapter): validate once, resolve
  once, run.
* :mod:`.dispatch`: the ``auto`` policy table, what each call needs, the resolver and
  its cache.
* :mod:`.validate`, :mod:`.multi_adapter`: argument checks (every error names the
  argument); the mixed-batch contract.

Above the backends (``salt_kernels.backends``), below the nn layers.
"""

from .dispatch import (AUTO_POLICY, BackendUnavailableError, available_backends, clear_backend_cache, resolve_backend,
                       why_unavailable)
from .linear import salt_linear, salt_linear_multi

__all__ = ["AUTO_POLICY", "BackendUnavailableError", "available_backends", "clear_backend_cache",
           "resolve_backend", "salt_linear", "salt_linear_multi", "why_unavailable"]
