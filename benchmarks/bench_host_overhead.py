"""Host overhead of one SALT layer call on the ``triton`` backend: the Python between the
user's call and the kernel launches, measured on a CPU.

    PYTHONPATH=. python benchmarks/bench_host_overhead.py [--min-time 1] [--shape M,K,D,r,r']

At decode a layer's GPU work is a few microseconds, so this host time decides the speed.
The script runs the public call (``salt_linear(..., backend="triton")`` and
``SALTLinear.forward``, forward under ``no_grad`` and forward+backward) with every Triton
kernel launch replaced by a no-op, so what is timed is everything else: validation,
backend resolution, the core ``C``, the cached launch plan, output allocation, autograd.
(Triton's own launcher, which a GPU run adds, is not included.) The Triton interpreter
makes the backend available without a GPU (``TRITON_INTERPRET=1`` is set here); no
kernel runs. For comparison, the same calls on the ``reference`` chain, on the same
(tiny) CPU tensors, measured in the same interleaved rounds: its cost is the host cost
of its ATen ops (their CPU arithmetic at this size is well under a microsecond).

Prints one line per comparison and, last, the line
``host overhead: forward N us, forward+backward N us per layer call``
(median of the per-round medians of ``salt_linear`` on ``triton``).
"""

from __future__ import annotations

import argparse
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the backend runs on CPU tensors

import torch  # noqa: E402

import salt_kernels  # noqa: E402
from salt_kernels.backends.triton import kernels as tk  # noqa: E402
from salt_kernels.tools.bench import layer_step, paired_ratio, time_steps  # noqa: E402
from salt_kernels.tools.bench.timing import describe, environment  # noqa: E402


def _no_launch(kernel, grid, args, kwargs):
    """Stands in for ``kernel[grid](*args, **kwargs)``: plans, grids and arguments are
    built as for a real launch; only the launch itself is skipped."""


def no_op_launches() -> None:
    tk._launch = _no_launch


def _inputs(M, K, D, r, rl, grad: bool):
    g = torch.Generator().manual_seed(0)
    t = dict(x=torch.randn(M, K, generator=g), U=torch.randn(D, r, generator=g) / D ** 0.5,
             V=torch.randn(K, r, generator=g) / K ** 0.5, sigma=torch.rand(r, generator=g) + 0.5,
             X=torch.randn(r, rl, generator=g), Y=torch.randn(rl, r, generator=g), bias=torch.randn(D, generator=g))
    trained = ("x", "sigma", "X", "Y", "bias")
    for name in trained:
        t[name].requires_grad_(grad)
    return t, [t[n] for n in trained], torch.randn(M, D, generator=g)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per step (default 1)")
    ap.add_argument("--shape", default="1,64,64,16,4", help="M,K,D,r,r' (default: decode-like, tiny: 1,64,64,16,4)")
    args = ap.parse_args(argv)
    M, K, D, r, rl = (int(v) for v in args.shape.split(","))
    torch.set_num_threads(1)
    no_op_launches()
    t, trained, grad_out = _inputs(M, K, D, r, rl, grad=True)
    layer = salt_kernels.SALTLinear(K, D, r, rl, backend="triton")

    def call(backend):
        def forward(x, U, V, sigma, X, Y, bias):
            return salt_kernels.salt_linear(x, U, V, sigma, X, Y, bias, backend=backend)
        return forward

    def module_call(backend):
        def forward(x, *_):
            layer.backend = backend
            return layer(x)
        return forward

    layer_trained = [t["x"]] + [p for p in layer.parameters() if p.requires_grad]
    steps = {}
    for mode in ("fwd", "fwd+bwd"):
        for backend in ("triton", "reference"):
            steps[("salt_linear", backend, mode)] = layer_step(call(backend), [(t, trained, grad_out)], mode)
            steps[("SALTLinear", backend, mode)] = layer_step(module_call(backend), [((t["x"],), layer_trained,
                                                                                     grad_out)], mode)
    names = {k: " ".join(k) for k in steps}
    times = time_steps({names[k]: s for k, s in steps.items()}, "cpu", args.min_time)
    print(f"host overhead of one layer call, M={M} K={K} D={D} r={r} r'={rl}, Triton launches replaced by no-ops; "
          f"{describe(environment('cpu', torch.float32))}")
    for api in ("salt_linear", "SALTLinear"):
        for mode in ("fwd", "fwd+bwd"):
            tri, ref = times[names[(api, "triton", mode)]], times[names[(api, "reference", mode)]]
            ratio = paired_ratio(ref, tri)
            print(f"  {api:11s} {mode:8s} triton {tri.median * 1e6:7.1f} us   reference chain {ref.median * 1e6:7.1f} us"
                  f"   reference / triton {ratio.median:.2f}±{ratio.spread:.2f}")
    fwd, fwd_bwd = (times[names[("salt_linear", "triton", mode)]].median * 1e6 for mode in ("fwd", "fwd+bwd"))
    print(f"host overhead: forward {fwd:.0f} us, forward+backward {fwd_bwd:.0f} us per layer call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
