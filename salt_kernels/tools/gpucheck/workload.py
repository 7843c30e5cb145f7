"""What the GPU check runs: its test selection, the sizes of its CUDA-graph and compile
steps, the numerics dtypes and the benchmark's presets. The steps (:mod:`.steps`) run
them; :mod:`.plan` records the Triton launches they make."""

from __future__ import annotations

from .process import Context

# The GPU test suite: test_triton.py and test_salt_linear.py run on CUDA whenever it is
# present (DEVICE at module level); the others parametrize over devices (ids with
# "cuda") or carry the gpu marker. Left out: the ahead-of-time compile test and the
# build tests (no GPU needed, CI runs them, minutes each), and test_compile.py (24
# Inductor compiles, about 8 s each: the compile step checks torch.compile on every CUDA
# backend instead). Numerics first: a run stopped at the budget loses the last files,
# not these; a file that fails to import does not take the others with it.
GPU_TEST_FILES = ["tests/test_triton.py", "tests/test_extension.py", "tests/test_salt_linear.py",
                  "tests/test_model.py", "tests/test_conformance.py", "tests/test_warmup.py"]
GPU_TEST_SELECT = "(test_triton.py or test_salt_linear.py or {device} or gpu) and not aot and not build"


def gpu_test_args(record: bool = False) -> list:
    """pytest arguments of the tests step on a GPU; ``record``: the same selection with
    the CPU twins of its CUDA-only test ids, which plan the same Triton launches
    (:func:`plan.record_plan` runs them on CPU)."""
    return [*GPU_TEST_FILES, "-k", GPU_TEST_SELECT.format(device="cpu" if record else "cuda"),
            "--continue-on-collection-errors"] + ([] if record else ["--durations=30"])


# The numerics step: every backend against the float64 formula (forward and every
# gradient) on the benchmark's odd verification shapes, in each dtype.
NUMERICS_DTYPES = ("float32", "float16", "bfloat16")


def sizes(ctx):
    """(K, D, r, r', token counts, dtype) of the compile and CUDA-graph steps."""
    import torch

    if ctx.dry_run:
        return 24, 20, 6, 3, (2, 3, 5, 8, 13, 37), torch.float32
    return 1024, 1536, 64, 8, (7, 64, 300, 1000, 2048, 4097), torch.bfloat16


CUDAGRAPH_COUNTS = 4  # the CUDA-graph step captures the first of sizes()' token counts


def bench_options(ctx: Context) -> dict:
    """What the bench step times: presets, dtype, seconds per measurement."""
    if ctx.dry_run:
        return dict(device="cpu", presets="smoke", dtype="fp32", min_time="0.02")
    return dict(device="cuda", presets="tokens,decode,llama7b", dtype="bf16", min_time="0.1")
