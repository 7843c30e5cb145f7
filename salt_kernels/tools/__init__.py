"""Developer tools built on the library; the library never imports them.

* :mod:`.bench`: the benchmark toolkit and ``salt-bench`` (verify every backend, then time it).
* :mod:`.aot`: ``python -m salt_kernels.tools.aot``, compile every Triton launch for sm_80/sm_90.
* :mod:`.gpucheck`: ``python -m salt_kernels.tools.gpucheck``, the one-command GPU check.
"""
