"""CPU timings of the variants against the dense layers they replace (median of
torch.utils.benchmark blocked_autorange; forward and forward+backward).

    PYTHONPATH=. python benchmarks/bench_variants.py [--threads N]

Timings on a shared machine are noisy: compare ratios within one run.
"""

import argparse

import torch
from torch import nn
from torch.utils import benchmark

from salt_kernels import SALTConv2d, SALTLinear


def _time(fn, min_run_time=1.0):
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def _fwd_bwd(module, x):
    def run():
        module(x).sum().backward()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads")

    lin = nn.Linear(768, 768)
    x = torch.randn(4096, 768, requires_grad=True)
    rows = [("nn.Linear 768->768", lin)]
    for kw in ({}, {"sigma_mode": "scale_shift"}, {"residual": True}):
        layer = SALTLinear.from_linear(lin, 64, 8, **kw)
        rows.append((f"SALTLinear r=64 {kw or 'direct'}", layer))
    print(f"M=4096 rows")
    for name, m in rows:
        with torch.no_grad():
            f = _time(lambda: m(x))
        print(f"  {name:45s} fwd {f:7.2f} ms   fwd+bwd {_time(_fwd_bwd(m, x)):7.2f} ms")

    conv = nn.Conv2d(256, 256, 3, padding=1)  # a SAM-neck-like 3x3 conv
    xc = torch.randn(1, 256, 64, 64, requires_grad=True)
    rows = [("nn.Conv2d 256->256 3x3", conv)]
    for kw in ({}, {"residual": True}):
        rows.append((f"SALTConv2d r=32 {kw or 'direct'}", SALTConv2d.from_conv2d(conv, 32, 8, **kw)))
    print("input 1x256x64x64")
    for name, m in rows:
        with torch.no_grad():
            f = _time(lambda: m(xc))
        print(f"  {name:45s} fwd {f:7.2f} ms   fwd+bwd {_time(_fwd_bwd(m, xc)):7.2f} ms")


if __name__ == "__main__":
    main()
