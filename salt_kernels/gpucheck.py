"""An alias of :mod:`salt_kernels.tools.gpucheck`: ``python -m salt_kernels.gpucheck`` runs it."""

if __name__ == "__main__":
    import sys

    from salt_kernels.tools.gpucheck import main

    sys.exit(main())
