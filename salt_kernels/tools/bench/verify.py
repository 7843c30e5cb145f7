"""Verification: every backend against the float64 dense formula, before any timing."""

from __future__ import annotations

import math

import torch

from ...ops import available_backends, salt_linear

# Max |error| relative to max |float64 truth|, per dtype. Kept equal to the tests'
# TOLERANCES table (tests/salt_testing.py; tests/test_bench.py checks they agree).
VERIFY_TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
}

# (M, K, D, r, r'): none a multiple of a block size; a single row; r' = 0.
VERIFY_SHAPES = [(33, 65, 47, 17, 8), (1, 128, 96, 16, 4), (130, 96, 200, 24, 0)]
VERIFY_GRADS = ("x", "sigma", "X", "Y", "bias")


def _verify_inputs(M, K, D, r, rl, g):
    """float64 SALT tensors scaled like a real layer (orthonormal-ish U, V; sigma ~ 1)."""
    return dict(
        x=torch.randn(M, K, generator=g, dtype=torch.float64),
        U=torch.randn(D, r, generator=g, dtype=torch.float64) * D ** -0.5,
        V=torch.randn(K, r, generator=g, dtype=torch.float64) * K ** -0.5,
        sigma=torch.rand(r, generator=g, dtype=torch.float64) + 0.5,
        X=torch.randn(r, rl, generator=g, dtype=torch.float64) * 0.5,
        Y=torch.randn(rl, r, generator=g, dtype=torch.float64) * 0.5,
        bias=torch.randn(D, generator=g, dtype=torch.float64) * 0.1,
    )


def _dense_f64(x, U, V, sigma, X, Y, bias):
    return x @ (U @ (torch.diag(sigma) + X @ Y) @ V.t()).t() + bias


def _rel_err(actual, expected) -> float:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if not expected.numel():
        return 0.0
    err = (actual.detach().double().cpu() - expected).abs().max().item()
    return err / scale if scale > 0 else err


def verify_backends(device, dtypes=(torch.float32,), backends=None, seed: int = 0) -> dict:
    """Max relative error (forward and the gradients of x, sigma, X, Y, bias) of each
    backend against the float64 dense formula, per dtype.

    Returns ``{backend: {dtype: (max_err, tolerance, worst_quantity)}}``. ``x`` is
    passed non-contiguous (a transposed view) on every other shape, as real layers see it.
    """
    device = torch.device(device)
    backends = available_backends(device) if backends is None else backends
    results: dict = {b: {} for b in backends}
    g = torch.Generator().manual_seed(seed)
    for i, (M, K, D, r, rl) in enumerate(VERIFY_SHAPES):
        t64 = {k: v.requires_grad_(k in VERIFY_GRADS) for k, v in _verify_inputs(M, K, D, r, rl, g).items()}
        y64 = _dense_f64(**t64)
        grad_out = torch.randn(y64.shape, generator=g, dtype=torch.float64)
        truth = dict(zip(("y",) + VERIFY_GRADS,
                         (y64.detach(), *torch.autograd.grad(y64, [t64[n] for n in VERIFY_GRADS], grad_out))))
        for dtype in dtypes:
            for name in backends:
                args = {}
                for k, v in t64.items():
                    a = v.detach().to(device=device, dtype=dtype)
                    if k == "x" and i % 2 == 0:
                        a = a.t().contiguous().t()  # same values, column-major strides
                    args[k] = a.requires_grad_(k in VERIFY_GRADS)
                try:
                    y = salt_linear(**args, backend=name)
                    got = dict(zip(("y",) + VERIFY_GRADS,
                                   (y, *torch.autograd.grad(y, [args[n] for n in VERIFY_GRADS],
                                                            grad_out.to(device=device, dtype=dtype),
                                                            allow_unused=True))))
                except Exception as exc:  # a crashing backend fails verification; the others go on
                    results[name][dtype] = (math.inf, VERIFY_TOLERANCES[dtype],
                                            f"raised {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                if math.isinf(results[name].get(dtype, (0.0,))[0]):
                    continue  # keep the first error message
                for q, expected in truth.items():
                    a = got[q]
                    err = math.inf if a is None or a.shape != expected.shape else _rel_err(a, expected)
                    if expected.numel() == 0:
                        err = 0.0  # empty X, Y at r' = 0: nothing to compare
                    prev = results[name].get(dtype, (-1.0, None, None))
                    if err > prev[0] or math.isnan(err):
                        results[name][dtype] = (err, VERIFY_TOLERANCES[dtype], q)
    return results


def verification_passed(entry) -> bool:
    err, tol, _ = entry
    return not math.isnan(err) and err <= tol
