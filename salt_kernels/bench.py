"""An alias of :mod:`salt_kernels.tools.bench` (the benchmark toolkit behind
``salt-bench``): ``python -m salt_kernels.bench`` runs it, and its public names import
from here too."""

from salt_kernels.tools.bench import *  # noqa: F401,F403
from salt_kernels.tools.bench import __all__  # noqa: F401

if __name__ == "__main__":
    import sys

    from salt_kernels.tools.bench import main

    sys.exit(main())
