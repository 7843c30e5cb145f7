"""The ``cpu`` backend (C++ extension) against plain PyTorch, side by side in one process.

    PYTHONPATH=. python benchmarks/bench_cpu_backend.py [--min-time 2] [--threads N]

Issue #4's shapes, float32. Four ways to compute the same layer, interleaved (every
round runs each of them, so a noisy neighbour slows all alike; ``salt_kernels.bench``'s
sampler):

* ``chain``: the autograd chain exactly as the issue states its baseline,
  ``z = x@V; t = z*σ + (z@Yᵀ)@Xᵀ; y = t@Uᵀ + b`` (``bench_baselines.unfused_salt_chain``);
* ``reference``: our ``reference`` backend, the same chain with bias and mix fused
  through ``addmm`` (a stronger baseline than the issue asks for);
* ``cpu``: the extension;
* ``GEMM floor``: only the layer's large GEMMs (2 forward, 2 more backward, MKL, into
  preallocated outputs). No implementation that uses these GEMMs can be faster; its
  ratio to the baselines bounds the speedup any such implementation can reach.

Forward runs under ``no_grad``; forward+backward takes the gradients of x, σ, X, Y and b.
Reported: min and median per call, speedups of ``cpu`` over both baselines, the bound
(baseline / floor), achieved GFLOP/s as a fraction of a square float32 matmul timed in
the same rounds, and the peak extra resident memory of one forward+backward, measured
in a fresh subprocess per method (VmHWM after resetting it, minus VmRSS before: this
sees every allocation, torch's allocator or not).
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


def make_inputs(M, K, D, r, rl, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).requires_grad_()
    U = torch.randn(D, r, generator=g) * D ** -0.5
    V = torch.randn(K, r, generator=g) * K ** -0.5
    sigma = (torch.rand(r, generator=g) + 0.5).requires_grad_()
    X = (torch.randn(r, rl, generator=g) * 0.5).requires_grad_()
    Y = (torch.randn(rl, r, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(D, generator=g) * 0.1).requires_grad_()
    G = torch.randn(M, D, generator=g)
    return (x, U, V, sigma, X, Y, b), G


def forward(layer, args):
    with torch.no_grad():
        return layer(*args)


def forward_backward(layer, args, G):
    y = layer(*args)
    torch.autograd.grad(y, [a for a in args if a.requires_grad], G)


class GemmFloor:
    """The layer's large GEMMs alone, into preallocated outputs: x V and Z Uᵀ (+ b, by
    addmm) forward; G U and dT Vᵀ backward. The r x r work, db, allocation and autograd
    are left out, so this is a lower bound on any implementation built on these GEMMs."""

    def __init__(self, args, G):
        x, self.U, self.V, _, _, _, self.b = (a.detach() for a in args)
        self.x, self.G = x, G
        M, r = x.shape[0], self.V.shape[1]
        self.Z, self.y = torch.empty(M, r), torch.empty(M, self.U.shape[0])
        self.dT, self.dx = torch.empty(M, r), torch.empty_like(x)

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
    """A square float32 matmul into a preallocated output: the machine's attainable GEMM
    rate, timed inside the same interleaved rounds as the layers (same conditions)."""

    def __init__(self, n=1536):
        self.a, self.b, self.out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        self.flop = 2 * n ** 3

    def __call__(self):
        torch.mm(self.a, self.b, out=self.out)


def peak_memory_child(shape_idx: int, name: str) -> None:
    """Runs in a fresh process: peak extra RSS (MiB) of one forward+backward."""
    _, M, K, D, r, rl = SHAPES[shape_idx]
    args, G = make_inputs(M, K, D, r, rl)
    layer = LAYERS[name]
    # Initialise libraries, thread pools and autograd first: measure the layer, not them.
    small, G_small = make_inputs(64, K, 64, r, rl)
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


def peak_memory(shape_idx: int, name: str, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--child", str(shape_idx), name],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of samples per method and mode")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        peak_memory_child(int(a.child[0]), a.child[1])
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, interleaved rounds "
          f"(ms per call: min / median)")
    matmul = SquareMatmul()
    picked = range(len(SHAPES)) if a.shapes is None else [int(i) for i in a.shapes.split(",")]
    for i in picked:
        name, M, K, D, r, rl = SHAPES[i]
        args, G = make_inputs(M, K, D, r, rl)
        floor = GemmFloor(args, G)
        steps = {"square matmul": matmul}
        for mode in ("fwd", "fwd+bwd"):
            for layer_name, layer in LAYERS.items():
                steps[layer_name, mode] = ((lambda L=layer: forward(L, args)) if mode == "fwd"
                                           else (lambda L=layer: forward_backward(L, args, G)))
            steps["GEMM floor", mode] = floor.forward if mode == "fwd" else floor.forward_backward
        samples = sample_steps(steps, a.min_time)
        peak = matmul.flop / min(samples.pop("square matmul")) / 1e9
        print(f"\n{name}: M={M} K={K} D={D} r={r} r'={rl}   (square fp32 matmul: {peak:.0f} GFLOP/s)")
        for mode, fl in zip(("fwd", "fwd+bwd"), flops(M, K, D, r)):
            best = {n: min(samples[n, mode]) for n in (*LAYERS, "GEMM floor")}
            med = {n: statistics.median(samples[n, mode]) for n in best}
            print("  " + mode.ljust(8) + "   ".join(f"{n} {best[n]*1e3:.1f} / {med[n]*1e3:.1f}" for n in best))
            gf = fl / best["cpu"] / 1e9
            for base in ("chain", "reference"):
                print(f"      cpu over {base:9s}: {best[base]/best['cpu']:.2f}x (min) {med[base]/med['cpu']:.2f}x "
                      f"(median)   bound (floor): {best[base]/best['GEMM floor']:.2f}x")
            print(f"      cpu {gf:.0f} GFLOP/s = {gf/peak:.2f} of the square matmul")
        mem = {n: peak_memory(i, n, torch.get_num_threads()) for n in LAYERS}
        print("  peak extra memory fwd+bwd (MiB): " + ", ".join(f"{n} {v:.0f}" for n, v in mem.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
