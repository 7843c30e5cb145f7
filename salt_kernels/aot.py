"""An alias of :mod:`salt_kernels.tools.aot`: ``python -m salt_kernels.aot`` runs it."""

if __name__ == "__main__":
    import sys

    from salt_kernels.tools.aot import main

    sys.exit(main())
