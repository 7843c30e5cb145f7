"""``salt-bench``: the package's main job (verification, then timing).

This first version verifies every available backend against the float64 formula on a
few shapes and exits non-zero if one is wrong; timing comes with the benchmark issue.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import available_backends, salt_linear


def verify_backends(device: torch.device, seed: int = 0) -> dict[str, float]:
    """Max relative forward error of each available backend vs float64, over a few shapes."""
    g = torch.Generator().manual_seed(seed)
    errors: dict[str, float] = {}
    for M, K, D, r, rl in [(33, 65, 47, 17, 8), (1, 128, 96, 16, 4), (130, 96, 200, 24, 0)]:
        t = [torch.randn(*s, generator=g, dtype=torch.float64) for s in
             [(M, K), (D, r), (K, r), (r,), (r, rl), (rl, r), (D,)]]
        x, U, V, sigma, X, Y, b = t
        W = U @ (torch.diag(sigma) + X @ Y) @ V.t()
        expect = x @ W.t() + b
        for name in available_backends(device):
            args = [a.to(device=device, dtype=torch.float32) for a in t]
            y = salt_linear(*args, backend=name).double().cpu()
            err = ((y - expect).abs().max() / expect.abs().max()).item()
            errors[name] = max(errors.get(name, 0.0), err)
    return errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="salt-bench", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small, fast run (default on CPU)")
    p.add_argument("--output", default=None, help="directory for CSV and plots")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"salt-bench: device={device}, torch {torch.__version__}")
    ok = True
    for name, err in verify_backends(device).items():
        good = err < 1e-4
        ok &= good
        print(f"  verify {name:10s} max rel err (fp32 vs fp64) = {err:.2e}  {'ok' if good else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
