"""The ``cpu`` backend (C++ extension) against plain PyTorch, side by side in one process.

    PYTHONPATH=. python benchmarks/bench_cpu_backend.py [--min-time 2] [--threads N] [--dtype bfloat16]

Issue #4's shapes, float32 by default. Four ways to compute the same layer, interleaved
(every round runs each of them, so a noisy neighbour slows all alike;
``salt_kernels.bench``'s sampler):

* ``chain``: the autograd chain exactly as the issue states its baseline,
  ``z = x@V; t = z*σ + (z@Yᵀ)@Xᵀ; y = t@Uᵀ + b`` (``bench_baselines.unfused_salt_chain``);
* ``reference``: our ``reference`` backend, the same chain with bias and mix fused
  through ``addmm`` (a stronger baseline than the issue asks for);
* ``cpu``: the extension;
* ``GEMM floor``: only the layer's large GEMMs (2 forward, 2 more backward, into
  preallocated outputs). No implementation that uses these GEMMs can be faster; its
  ratio to the baselines bounds the speedup any such implementation can reach.

Forward runs under ``no_grad``; forward+backward takes the gradients of x, σ, X, Y and b.
Reported: min and median per call, speedups of ``cpu`` over both baselines, the bound
(baseline / floor), achieved GFLOP/s as a fraction of a square matmul (in the dtype the
``cpu`` kernel's GEMMs run in) timed in the same rounds, and the peak extra resident
memory of one forward+backward, measured in a fresh subprocess per method (VmHWM after
resetting it, minus VmRSS before: this sees every allocation, torch's allocator or not).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys

import torch

from salt_kernels.backends import extension, reference
from salt_kernels.bench import sample_steps
from salt_kernels.bench_baselines import unfused_salt_chain

# (name, M, K, D, r, r')
SHAPES = [
    ("ViT-B qkv-proj 768->768", 4096, 768, 768, 64, 8),
    ("ViT-B mlp-up 768->3072", 4096, 768, 3072, 64, 8),
    ("LLM 4096->4096", 2048, 4096, 4096, 128, 16),
]

LAYERS = {
    "chain": lambda x, U, V, s, X, Y, b: unfused_salt_chain(x, U, V, s, X, Y, b),
    "reference": lambda *a: reference.salt_linear_2d(*a, 1.0),
    "cpu": lambda *a: extension.salt_linear_2d(*a, 1.0),
}


def make_inputs(M, K, D, r, rl, seed=0, dtype=torch.float32):
    """Layer inputs in ``dtype`` (x, σ, X, Y, b require grad; U, V frozen) and an
    upstream gradient G."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(grad)
    x = randn(M, K, grad=True)
    U, V = randn(D, r, scale=D ** -0.5), randn(K, r, scale=K ** -0.5)
    sigma = (torch.rand(r, generator=g) + 0.5).to(dtype).requires_grad_()
    X, Y = randn(r, rl, scale=0.5, grad=True), randn(rl, r, scale=0.5, grad=True)
    b = randn(D, scale=0.1, grad=True)
    return (x, U, V, sigma, X, Y, b), randn(M, D)


def forward(layer, args):
    with torch.no_grad():
        return layer(*args)


def forward_backward(layer, args, G):
    y = layer(*args)
    torch.autograd.grad(y, [a for a in args if a.requires_grad], G)


class GemmFloor:
    """The layer's large GEMMs alone, into preallocated outputs: x V and Z Uᵀ (+ b, by
    addmm) forward; G U and dT Vᵀ backward; in the dtype the ``cpu`` kernel runs them in
    (``extension.cpu_gemm_dtype``; inputs converted beforehand, untimed). The r x r work,
    db, conversions, allocation and autograd are left out, so this is a lower bound on
    any implementation built on these GEMMs."""

    def __init__(self, args, G):
        dtype = extension.cpu_gemm_dtype(G.dtype)
        x, self.U, self.V, _, _, _, self.b = (a.detach().to(dtype) for a in args)
        self.x, self.G = x, G.to(dtype)
        M, r = x.shape[0], self.V.shape[1]
        self.Z, self.y = torch.empty(M, r, dtype=dtype), torch.empty(M, self.U.shape[0], dtype=dtype)
        self.dT, self.dx = torch.empty(M, r, dtype=dtype), torch.empty_like(x)

    def forward(self):
        torch.mm(self.x, self.V, out=self.Z)
        torch.addmm(self.b, self.Z, self.U.t(), out=self.y)

    def forward_backward(self):
        self.forward()
        torch.mm(self.G, self.U, out=self.dT)
        torch.mm(self.dT, self.V.t(), out=self.dx)


def flops(M, K, D, r):
    """Essential FLOPs (DESIGN.md section 1-2): forward 2Mr(K+D+r); backward adds dT, dC,
    dZ, dx: 2Mr(D+K+2r)."""
    fwd = 2 * M * r * (K + D + r)
    return fwd, fwd + 2 * M * r * (D + K + 2 * r)


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


def peak_memory_child(name: str, dtype: torch.dtype, M: int, K: int, D: int, r: int, rl: int) -> None:
    """Runs in a fresh process: peak extra RSS (MiB) of one forward+backward."""
    args, G = make_inputs(M, K, D, r, rl, dtype=dtype)
    layer = LAYERS[name]
    # Initialise libraries, thread pools and autograd first: measure the layer, not them.
    small, G_small = make_inputs(64, K, 64, r, rl, dtype=dtype)
    forward_backward(layer, small, G_small)
    del small, G_small
    gc.collect()

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024  # kB -> MiB
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    forward_backward(layer, args, G)
    print(json.dumps({"peak_extra_mib": status("VmHWM:") - before}))


def peak_memory(name: str, dtype_name: str, shape, threads: int, runs: int = 3) -> float:
    """Median over ``runs`` fresh processes (single runs scatter by about ±3 MiB)."""
    peaks = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--dtype", dtype_name,
                              "--child", name, *map(str, shape)],
                             check=True, capture_output=True, text=True)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"])
    return statistics.median(peaks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of samples per method and mode")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)  # layer name, M, K, D, r, r'
    p.add_argument("--memory-runs", type=int, default=3, help="fresh processes per peak-memory figure (median)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    if a.child:
        peak_memory_child(a.child[0], dtype, *map(int, a.child[1:]))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype} (cpu GEMMs in "
          f"{str(extension.cpu_gemm_dtype(dtype)).removeprefix('torch.')}), interleaved rounds (ms per call: min / median)")
    matmul = SquareMatmul(extension.cpu_gemm_dtype(dtype))
    picked = range(len(SHAPES)) if a.shapes is None else [int(i) for i in a.shapes.split(",")]
    for i in picked:
        name, M, K, D, r, rl = SHAPES[i]
        args, G = make_inputs(M, K, D, r, rl, dtype=dtype)
        floor = GemmFloor(args, G)
        steps = {"square matmul": matmul}
        for mode in ("fwd", "fwd+bwd"):
            for layer_name, layer in LAYERS.items():
                steps[layer_name, mode] = ((lambda L=layer: forward(L, args)) if mode == "fwd"
                                           else (lambda L=layer: forward_backward(L, args, G)))
            steps["GEMM floor", mode] = floor.forward if mode == "fwd" else floor.forward_backward
        samples = sample_steps(steps, a.min_time)
        peak = matmul.flop / min(samples.pop("square matmul")) / 1e9
        print(f"\n{name}: M={M} K={K} D={D} r={r} r'={rl}   (square {str(matmul.dtype).removeprefix('torch.')} matmul: {peak:.0f} GFLOP/s)")
        for mode, fl in zip(("fwd", "fwd+bwd"), flops(M, K, D, r)):
            best = {n: min(samples[n, mode]) for n in (*LAYERS, "GEMM floor")}
            med = {n: statistics.median(samples[n, mode]) for n in best}
            print("  " + mode.ljust(8) + "   ".join(f"{n} {best[n]*1e3:.1f} / {med[n]*1e3:.1f}" for n in best))
            gf = fl / best["cpu"] / 1e9
            for base in ("chain", "reference"):
                print(f"      cpu over {base:9s}: {best[base]/best['cpu']:.2f}x (min) {med[base]/med['cpu']:.2f}x "
                      f"(median)   bound (floor): {best[base]/best['GEMM floor']:.2f}x")
            print(f"      cpu {gf:.0f} GFLOP/s = {gf/peak:.2f} of the square matmul")
        mem = {n: peak_memory(n, a.dtype, (M, K, D, r, rl), torch.get_num_threads(), a.memory_runs)
               for n in LAYERS}
        print(f"  peak extra memory fwd+bwd (MiB, median of {a.memory_runs} processes): " + ", ".join(f"{n} {v:.0f}" for n, v in mem.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
