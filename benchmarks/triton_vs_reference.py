"""GPU benchmark of the triton backend against the reference PyTorch chain (needs CUDA).

    python benchmarks/triton_vs_reference.py [--dtype bf16] [--K 4096] [--D 4096] [--r 64]

For M in 1, 16, 64, 512, 8192 prints forward and forward+backward times (median of
triton.testing.do_bench), the speedups that the issue targets (forward >= 1.5x at
M <= 512 and >= 1.1x at M = 8192, forward+backward >= 1.3x), and the forward's achieved
bandwidth against the DESIGN.md section 6 minimum traffic (read x, U, V; write y).
Nothing here is asserted: these are measurements.
"""

import argparse

import torch
import triton

import salt_kernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--D", type=int, default=4096)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--r-lora", type=int, default=8)
    p.add_argument("--peak-gbs", type=float, default=3350.0, help="HBM bandwidth, GB/s (H100 SXM)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    dt, K, D, r = DTYPES[args.dtype], args.K, args.D, args.r
    dev = "cuda"
    U = torch.randn(D, r, device=dev, dtype=dt) / D ** 0.5
    V = torch.randn(K, r, device=dev, dtype=dt) / K ** 0.5
    sigma = torch.rand(r, device=dev, requires_grad=True)
    X = torch.randn(r, args.r_lora, device=dev, requires_grad=True)
    Y = torch.randn(args.r_lora, r, device=dev, requires_grad=True)
    b = torch.zeros(D, device=dev, dtype=dt, requires_grad=True)
    print(f"{torch.cuda.get_device_name()}  dtype={args.dtype} K={K} D={D} r={r} r'={args.r_lora}")
    print(f"{'M':>6} {'ref fwd us':>10} {'tri fwd us':>10} {'fwd x':>6} {'ref f+b us':>10} {'tri f+b us':>10} {'f+b x':>6} {'fwd GB/s':>9} {'% peak':>6}")
    for M in (1, 16, 64, 512, 8192):
        x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
        G = torch.randn(M, D, device=dev, dtype=dt)
        res = {}
        for name in ("reference", "triton"):
            def fwd():
                with torch.no_grad():
                    return salt_kernels.salt_linear(x, U, V, sigma, X, Y, b, backend=name)

            def fwd_bwd():
                y = salt_kernels.salt_linear(x, U, V, sigma, X, Y, b, backend=name)
                y.backward(G)

            res[name] = (triton.testing.do_bench(fwd) * 1e3, triton.testing.do_bench(fwd_bwd) * 1e3)
        bytes_min = (M * K + M * D + D * r + K * r) * x.element_size()
        gbs = bytes_min / (res["triton"][0] * 1e-6) / 1e9
        print(f"{M:6d} {res['reference'][0]:10.1f} {res['triton'][0]:10.1f} {res['reference'][0] / res['triton'][0]:6.2f} "
              f"{res['reference'][1]:10.1f} {res['triton'][1]:10.1f} {res['reference'][1] / res['triton'][1]:6.2f} "
              f"{gbs:9.0f} {100 * gbs / args.peak_gbs:6.1f}")


if __name__ == "__main__":
    main()
