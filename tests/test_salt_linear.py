"""salt_linear on every backend against the float64 formula: forward and every gradient
over odd shapes, leading dims, 1-D/empty input, non-contiguous x, bias/no bias, dtypes.

Backends that cannot run here are skipped with the reason (never reported as passing).
"""

import pytest
import torch

import salt_kernels
from salt_kernels.ops.dispatch import unavailable_reason
from salt_testing import TOLERANCES, assert_matches_ground_truth, make_salt_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton", "cpu", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading dims, K, D, r, r')  -- none of K, D, r a multiple of a block size
SHAPES = [
    ((7,), 33, 29, 5, 3),
    ((2, 3), 65, 47, 17, 8),
    ((1,), 19, 130, 12, 12),   # r' == r, D > K
    ((37,), 100, 24, 24, 0),   # full rank (r = min(D, K)), r' = 0: singular values only
    ((3, 5, 2), 40, 72, 1, 1), # r = 1, three leading dims
    ((), 23, 31, 6, 2),        # 1-D x
    ((0,), 21, 13, 4, 2),      # empty batch
    ((5, 9), 20, 18, 6, 3),    # M > K and M > D (the cpu backend folds the mix into U, V)
]


def _fn(backend):
    def fn(**kw):
        return salt_kernels.salt_linear(**kw, backend=backend)
    return fn


def _require(backend):
    reason = unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.skip(f"backend '{backend}' unavailable on {DEVICE}: {reason}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64(backend, dtype, shape, bias):
    _require(backend)
    lead, K, D, r, rl = shape
    t = make_salt_inputs(lead, K, D, r, rl, dtype, bias=bias, device=DEVICE)
    assert_matches_ground_truth(_fn(backend), t, dtype, scaling=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_x(backend, dtype):
    _require(backend)
    t = make_salt_inputs((11,), 37, 26, 9, 4, dtype, device=DEVICE)
    # transposed storage: x is (11, 37) viewed from a (37, 11) buffer
    xt = t["x"].detach().t().contiguous().t().requires_grad_(True)
    assert not xt.is_contiguous()
    t["x"] = xt
    assert_matches_ground_truth(_fn(backend), t, dtype)
    # strided rows with a leading batch dim
    t = make_salt_inputs((2, 9), 74, 26, 9, 4, dtype, device=DEVICE)
    t["x"] = t["x"].detach()[..., ::2].requires_grad_(True)
    t["V"] = t["V"][::2].detach().clone()
    assert not t["x"].is_contiguous()
    assert_matches_ground_truth(_fn(backend), t, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_basis_gradients(backend):
    """dU and dV when the frozen basis requires grad: never silently zero."""
    _require(backend)
    t = make_salt_inputs((4, 5), 27, 35, 7, 3, torch.float32, device=DEVICE, grad_basis=True)
    assert_matches_ground_truth(_fn(backend), t, torch.float32, scaling=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_parameters_with_half_activations(backend):
    """sigma/X/Y may be float32 master parameters while x, U, V, bias are half."""
    _require(backend)
    t = make_salt_inputs((9,), 30, 20, 6, 2, torch.bfloat16, device=DEVICE, param_dtype=torch.float32)
    assert_matches_ground_truth(_fn(backend), t, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    _require(backend)
    t = make_salt_inputs((3,), 7, 6, 4, 2, torch.float64, device=DEVICE, grad_basis=True)
    names = ["x", "U", "V", "sigma", "X", "Y", "bias"]

    def f(*args):
        return salt_kernels.salt_linear(*args, scaling=0.5, backend=backend)

    assert torch.autograd.gradcheck(f, tuple(t[n] for n in names))


def test_tolerance_table_covers_dtypes():
    assert set(DTYPES) <= set(TOLERANCES)


def test_auto_matches_reference():
    t = make_salt_inputs((5,), 12, 9, 3, 1, device=DEVICE)
    y = salt_kernels.salt_linear(**t, backend="auto")
    ref = salt_kernels.salt_linear(**t, backend="reference")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
