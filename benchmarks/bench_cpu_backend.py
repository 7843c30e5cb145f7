"""The ``cpu`` backend (C++ extension) against plain PyTorch, side by side in one process.

    PYTHONPATH=. python benchmarks/bench_cpu_backend.py [--min-time 2] [--threads N] [--dtype bfloat16]
    PYTHONPATH=. python benchmarks/bench_cpu_backend.py --shape 4096,768,768,64,8   # one shape M,K,D,r,r'

float32 by default. Four ways to compute the same layer, timed by the benchmark
toolkit (``salt_kernels.tools.bench.timing``: warm-up, then interleaved rounds, so a noisy
neighbour slows all alike; inputs rotated through several copies):

* ``chain``: the plain autograd chain ``z = x@V; t = z*σ + (z@Yᵀ)@Xᵀ; y = t@Uᵀ + b``
  (``salt_kernels.tools.bench.baselines.unfused_salt_chain``);
* ``reference``: our ``reference`` backend, the same chain with bias and mix fused
  through ``addmm`` (a stronger baseline);
* ``cpu``: the extension;
* ``GEMM floor``: only the layer's large GEMMs (2 forward, 2 more backward, into
  preallocated outputs). No implementation that uses these GEMMs can be faster; its
  speed-up over the baselines bounds the speed-up any such implementation can reach.

Forward runs under ``no_grad``; forward+backward takes the gradients of x, σ, X, Y and b.
Reported (``salt_kernels.tools.bench.report``): min and median per call, the speed-ups over
both baselines (median of the per-round paired ratios ± half their interquartile
range), achieved GFLOP/s of ``cpu`` as a fraction of a square matmul (in the dtype the
``cpu`` kernel's GEMMs run in) timed in the same rounds, and the peak extra resident
memory of one forward+backward, measured in a fresh subprocess per method (VmHWM after
resetting it, minus VmRSS before: this sees every allocation, torch's allocator or not).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys

import torch

import salt_kernels
from salt_kernels.backends import extension, reference
from salt_kernels.tools.bench import (Method, Shape, Timing, format_columns, layer_step, make_input_sets, paired_ratio,
                                salt_inputs, time_steps)
from salt_kernels.tools.bench.baselines import unfused_salt_chain

# Shapes as Shape(preset, layer, M, K, D, r, r')
SHAPES = [
    Shape("cpu-backend", "ViT-B qkv-proj 768->768", 4096, 768, 768, 64, 8),
    Shape("cpu-backend", "ViT-B mlp-up 768->3072", 4096, 768, 3072, 64, 8),
    Shape("cpu-backend", "LLM 4096->4096", 2048, 4096, 4096, 128, 16),
]


def _layer(fn):
    def forward(x, U, V, sigma, X, Y, bias):
        return fn(x, U, V, sigma, X, Y, bias, 1.0)
    return forward


LAYERS = {
    "chain": unfused_salt_chain,
    "reference": _layer(reference.salt_linear_2d),
    "cpu": _layer(extension.salt_linear_2d),
}


def methods() -> list[Method]:
    return [Method(name, "salt", salt_inputs, fn) for name, fn in LAYERS.items()]


class GemmFloor:
    """The layer's large GEMMs alone, into preallocated outputs: x V and Z Uᵀ (+ b, by
    addmm) forward; G U and dT Vᵀ backward; in the dtype the ``cpu`` kernel runs them in
    (``extension.cpu_gemm_dtype``; inputs converted beforehand, untimed). The r x r work,
    db, conversions, allocation and autograd are left out, so this is a lower bound on
    any implementation built on these GEMMs."""

    def __init__(self, inputs):
        dtype = extension.cpu_gemm_dtype(inputs.grad_out.dtype)
        a = {k: v.detach().to(dtype) for k, v in inputs.args.items()}
        self.x, self.U, self.V, self.b, self.G = a["x"], a["U"], a["V"], a["bias"], inputs.grad_out.to(dtype)
        M, r = self.x.shape[0], self.V.shape[1]
        self.Z, self.y = torch.empty(M, r, dtype=dtype), torch.empty(M, self.U.shape[0], dtype=dtype)
        self.dT, self.dx = torch.empty(M, r, dtype=dtype), torch.empty_like(self.x)

    def forward(self):
        torch.mm(self.x, self.V, out=self.Z)
        torch.addmm(self.b, self.Z, self.U.t(), out=self.y)

    def forward_backward(self):
        self.forward()
        torch.mm(self.G, self.U, out=self.dT)
        torch.mm(self.dT, self.V.t(), out=self.dx)


def flops(s: Shape):
    """Essential FLOPs (docs/design.md, "The operator" and "Gradients"): forward
    2Mr(K+D+r); backward adds dT, dC, dZ, dx: 2Mr(D+K+2r)."""
    fwd = 2 * s.M * s.r * (s.K + s.D + s.r)
    return fwd, fwd + 2 * s.M * s.r * (s.D + s.K + 2 * s.r)


class SquareMatmul:
    """A square matmul into a preallocated output, in the ``cpu`` kernel's GEMM dtype: the
    machine's attainable GEMM rate, timed inside the same interleaved rounds as the
    layers (same conditions)."""

    def __init__(self, dtype, n=1536):
        self.dtype = dtype
        self.a, self.b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        self.out = torch.empty(n, n, dtype=dtype)
        self.flop = 2 * n ** 3

    def __call__(self):
        torch.mm(self.a, self.b, out=self.out)


def peak_memory_child(name: str, dtype: torch.dtype, shape: Shape) -> None:
    """Runs in a fresh process: peak extra RSS (MiB) of one forward+backward."""
    method = next(m for m in methods() if m.name == name)
    g = torch.Generator().manual_seed(0)
    inputs = salt_inputs(shape, dtype, "cpu", g)
    # Initialise libraries, thread pools and autograd first: measure the layer, not them.
    small = Shape(shape.preset, shape.layer, 64, shape.K, 64, shape.r, shape.rl)
    layer_step(method.forward, [_triple(salt_inputs(small, dtype, "cpu", g))], "fwd+bwd")()
    gc.collect()
    step = layer_step(method.forward, [_triple(inputs)], "fwd+bwd")

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024  # kB -> MiB
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    print(json.dumps({"peak_extra_mib": status("VmHWM:") - before}))


def _triple(inputs):
    return inputs.args, inputs.trainable, inputs.grad_out


def peak_memory(name: str, dtype_name: str, shape: Shape, threads: int, runs: int = 3) -> float:
    """Median over ``runs`` fresh processes (single runs scatter by about ±3 MiB)."""
    # the child imports the same salt_kernels as this process
    root = os.path.dirname(os.path.dirname(os.path.abspath(salt_kernels.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    peaks = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--dtype", dtype_name,
                              "--child", name, _shape_arg(shape)],
                             check=True, capture_output=True, text=True, env=env)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"])
    return statistics.median(peaks)


def _shape_arg(s: Shape) -> str:
    return f"{s.M},{s.K},{s.D},{s.r},{s.rl}"


def _parse_shape(arg: str) -> Shape:
    try:
        M, K, D, r, rl = (int(v) for v in arg.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected five integers M,K,D,r,r', got {arg!r}") from None
    return Shape("cpu-backend", f"{K}->{D}", M, K, D, r, rl)


def time_shape(shape: Shape, dtype, matmul: SquareMatmul, min_time: float):
    """Timings of every layer, the GEMM floor and the square matmul at ``shape``, each
    mode in its own interleaved run: ``{(name, mode): Timing}`` and the matmul's."""
    sets = {m.name: make_input_sets(m, shape, dtype, "cpu") for m in methods()}
    floor = GemmFloor(sets["cpu"][0])
    timings, square = {}, []
    for mode in ("fwd", "fwd+bwd"):
        steps = {m.name: layer_step(m.forward, [_triple(i) for i in sets[m.name]], mode) for m in methods()}
        steps["GEMM floor"] = floor.forward if mode == "fwd" else floor.forward_backward
        steps["square matmul"] = matmul
        got = time_steps(steps, "cpu", min_time)
        square += got.pop("square matmul").samples
        timings.update({(name, mode): t for name, t in got.items()})
    return timings, Timing(square)


def report(shape: Shape, timings: dict, matmul_gflops: float) -> str:
    """One table: per mode and method, min / median ms, the speed-ups over both
    baselines (for the GEMM floor: the bound), and GFLOP/s."""
    head = ["mode", "method", "min ms", "median ms", "×chain", "×reference", "GFLOP/s", "of matmul"]
    lines = []
    for mode, fl in zip(("fwd", "fwd+bwd"), flops(shape)):
        for name in (*LAYERS, "GEMM floor"):
            t = timings[name, mode]
            ratios = [paired_ratio(timings[base, mode], t) for base in ("chain", "reference")]
            lines.append([mode, name, f"{t.min * 1e3:.2f}", f"{t.median * 1e3:.2f}",
                          *(f"{r.median:.2f}±{r.spread:.2f}" for r in ratios),
                          f"{fl / t.min / 1e9:.0f}", f"{fl / t.min / 1e9 / matmul_gflops:.2f}"])
    return format_columns(head, lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of samples per method and mode")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    p.add_argument("--shape", type=_parse_shape, action="append", default=None,
                   help="a shape M,K,D,r,r' to run instead of SHAPES (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # layer name, shape
    p.add_argument("--memory-runs", type=int, default=3, help="fresh processes per peak-memory figure (median)")
    p.add_argument("--matmul-size", type=int, default=1536, help="n of the n x n reference matmul")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    if a.child:
        peak_memory_child(a.child[0], dtype, _parse_shape(a.child[1]))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype} (cpu GEMMs in "
          f"{str(extension.cpu_gemm_dtype(dtype)).removeprefix('torch.')}), interleaved rounds; "
          "×: median of the per-round paired speed-ups ± half their interquartile range; "
          "GFLOP/s from the min time")
    matmul = SquareMatmul(extension.cpu_gemm_dtype(dtype), a.matmul_size)
    shapes = a.shape or (SHAPES if a.shapes is None else [SHAPES[int(i)] for i in a.shapes.split(",")])
    for shape in shapes:
        timings, square = time_shape(shape, dtype, matmul, a.min_time)
        gflops = matmul.flop / square.min / 1e9
        print(f"\n{shape.layer}: M={shape.M} K={shape.K} D={shape.D} r={shape.r} r'={shape.rl}   "
              f"(square {str(matmul.dtype).removeprefix('torch.')} matmul: {gflops:.0f} GFLOP/s)")
        print(report(shape, timings, gflops))
        mem = {n: peak_memory(n, a.dtype, shape, torch.get_num_threads(), a.memory_runs) for n in LAYERS}
        print(f"peak extra memory fwd+bwd (MiB, median of {a.memory_runs} processes): "
              + ", ".join(f"{n} {v:.0f}" for n, v in mem.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
