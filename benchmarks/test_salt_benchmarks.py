"""pytest-benchmark suite: the comparisons of ``salt-bench`` (every available backend,
``auto``, the reference chain, dense ``nn.Linear`` and the official SALT way; forward and
forward+backward), built from :mod:`salt_kernels.tools.bench` so the inputs, baselines and
timed steps are the CLI's own.

    pytest benchmarks/ --benchmark-only                       # the "quick" preset
    SALT_BENCH_PRESETS=vit-b16,decode pytest benchmarks/ --benchmark-only
    SALT_BENCH_THREADS=1 pytest benchmarks/ --benchmark-only  # CPU intra-op threads

Not part of the normal test run (pyproject's testpaths is ``tests``). A backend is
verified against float64 before any of its benchmarks runs; a wrong one fails instead
of being timed. Triton kernels under the CPU interpreter are not benchmarked. On CUDA
each round ends with a synchronize, so the wall-clock timer sees the kernels' time.
"""

import os

import pytest
import torch

from salt_kernels import available_backends
from salt_kernels.tools import bench

if os.environ.get("SALT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SALT_BENCH_THREADS"]))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
PRESETS = os.environ.get("SALT_BENCH_PRESETS", "quick").split(",")
SHAPES = list(dict.fromkeys(s for p in PRESETS for s in bench.PRESETS[p.strip()]))
BACKENDS = [b for b in available_backends(DEVICE) if not bench.is_interpreted(b, DEVICE)]
# On CPU the official layer's weight rebuild for 4096-wide layers takes seconds per call.
METHODS = bench.build_methods(DEVICE, BACKENDS, official_max_gflop=None if DEVICE.type == "cuda" else 20.0,
                              auto=True)


@pytest.fixture(scope="session")
def verification():
    return bench.verify_backends(DEVICE, list(dict.fromkeys([torch.float32, DTYPE])), BACKENDS)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name.replace(" ", "_"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.layer.replace(' ', '_')}-M{s.M}-r{s.r}-{s.rl}")
def test_salt_layer(benchmark, verification, shape, method, mode):
    if method.kind == "salt":
        # auto may pick any available backend: all of them must be right
        checked = verification if method.name == bench.AUTO else {method.name: verification[method.name]}
        failed = {(b, str(dt)): e for b, r in checked.items() for dt, e in r.items() if not bench.verification_passed(e)}
        if failed:
            pytest.fail(f"backend {method.name!r} failed verification against float64: {failed}")
    reason = method.skip_reason(shape)
    if reason:
        pytest.skip(reason)
    step = bench.make_step(method, bench.make_input_sets(method, shape, DTYPE, DEVICE), mode,
                           sync=DEVICE.type == "cuda")
    step()  # warm-up outside the measurement
    benchmark.group = f"{shape.label} {mode}"
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), M=shape.M, K=shape.K, D=shape.D,
                                r=shape.r, r_lora=shape.rl)
    benchmark(step)
