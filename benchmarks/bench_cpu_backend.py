"""The ``cpu`` backend (C++ extension) against the straightforward PyTorch autograd chain
(the ``reference`` backend), side by side in one process.

    PYTHONPATH=. python benchmarks/bench_cpu_backend.py [--repeats 15] [--threads N]

For each shape: forward (no grad) and forward+backward (x, sigma, X, Y, bias require
grad) times, min and median over interleaved repeats (the two backends alternate, so a
noisy neighbour slows both alike); the speedups; achieved GFLOP/s as a fraction of a
square float32 matmul timed in the same run; and the peak extra resident memory of one
forward+backward, measured in a fresh subprocess per backend (VmHWM after resetting it,
minus VmRSS before: this sees every allocation, torch's allocator or not).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

from salt_kernels.backends import extension, reference

BACKENDS = {"reference": reference, "cpu": extension}

# (name, M, K, D, r, r')
SHAPES = [
    ("ViT-B qkv-proj 768->768", 4096, 768, 768, 64, 8),
    ("ViT-B mlp-up 768->3072", 4096, 768, 3072, 64, 8),
    ("LLM 4096->4096", 2048, 4096, 4096, 128, 16),
]


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


def forward(mod, args):
    with torch.no_grad():
        return mod.salt_linear_2d(*args, 1.0)


def forward_backward(mod, args, G):
    for t in args:
        t.grad = None
    y = mod.salt_linear_2d(*args, 1.0)
    y.backward(G)


def time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flops(M, K, D, r):
    """Essential FLOPs (DESIGN.md section 1-2): forward 2Mr(K+D+r); backward adds dT, dC,
    dZ, dx: 2Mr(D+K+2r)."""
    fwd = 2 * M * r * (K + D + r)
    return fwd, fwd + 2 * M * r * (D + K + 2 * r)


class SquareMatmul:
    """A square float32 matmul into a preallocated output: the machine's attainable GEMM
    rate, timed inside the same interleaved loop as the backends (same conditions)."""

    def __init__(self, n=1536):
        self.a, self.b, self.out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        self.flop = 2 * n ** 3

    def __call__(self):
        torch.mm(self.a, self.b, out=self.out)


def peak_memory_child(shape_idx: int, backend: str) -> None:
    """Runs in a fresh process: peak extra RSS (MiB) of one forward+backward."""
    _, M, K, D, r, rl = SHAPES[shape_idx]
    args, G = make_inputs(M, K, D, r, rl)
    mod = BACKENDS[backend]
    # Initialise libraries, thread pools and autograd first: measure the layer, not them.
    small, G_small = make_inputs(64, K, 64, r, rl)
    forward_backward(mod, small, G_small)
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
    forward_backward(mod, args, G)
    print(json.dumps({"peak_extra_mib": status("VmHWM:") - before}))


def peak_memory(shape_idx: int, backend: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", str(shape_idx), backend],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        peak_memory_child(int(a.child[0]), a.child[1])
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"{a.repeats} interleaved repeats (times in ms: min / median)")
    matmul = SquareMatmul()
    for i, (name, M, K, D, r, rl) in enumerate(SHAPES):
        args, G = make_inputs(M, K, D, r, rl)
        times = {(b, k): [] for b in BACKENDS for k in ("fwd", "fwd+bwd")}
        matmul_times = []
        matmul()
        for mod in BACKENDS.values():  # warm-up
            forward(mod, args)
            forward_backward(mod, args, G)
        for _ in range(a.repeats):
            matmul_times.append(time_once(matmul))
            for b, mod in BACKENDS.items():
                times[b, "fwd"].append(time_once(lambda: forward(mod, args)))
                times[b, "fwd+bwd"].append(time_once(lambda: forward_backward(mod, args, G)))
        f_fwd, f_fb = flops(M, K, D, r)
        peak = matmul.flop / min(matmul_times) / 1e9
        print(f"\n{name}: M={M} K={K} D={D} r={r} r'={rl}   (square fp32 matmul: {peak:.0f} GFLOP/s)")
        for kind, fl in (("fwd", f_fwd), ("fwd+bwd", f_fb)):
            row = []
            for b in BACKENDS:
                ts = times[b, kind]
                row.append((min(ts), statistics.median(ts)))
            (ref_min, ref_med), (cpu_min, cpu_med) = row
            gf = fl / cpu_min / 1e9
            print(f"  {kind:8s} reference {ref_min*1e3:7.1f} / {ref_med*1e3:7.1f}   cpu {cpu_min*1e3:7.1f} / "
                  f"{cpu_med*1e3:7.1f}   speedup {ref_min/cpu_min:.2f}x (min) {ref_med/cpu_med:.2f}x (median)"
                  f"   cpu {gf:.0f} GFLOP/s = {gf/peak:.2f} of matmul")
        mem = {b: peak_memory(i, b) for b in BACKENDS}
        print(f"  peak extra memory fwd+bwd: reference {mem['reference']:.0f} MiB, cpu {mem['cpu']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
