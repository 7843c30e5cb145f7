"""The shared autograd registration (salt_kernels.backends.autograd), checked with a
pure-torch op pair that follows the kernel-backend contract. Kernel backends reuse the
same registration, so this pins the chain rule independently of any kernel."""

import pytest
import torch

from salt_kernels.backends.autograd import register_salt_autograd, run_salt_op
from salt_testing import TOLERANCES, assert_matches_ground_truth, ground_truth, make_salt_inputs, max_rel_err


@torch.library.custom_op("salt_contract_test::forward", mutates_args=())
def _forward(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, C: torch.Tensor,
             bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    Z = x.to(C.dtype) @ V.to(C.dtype)
    y = (Z @ C.t()) @ U.to(C.dtype).t()
    if bias is not None:
        y = y + bias.to(C.dtype)
    return y.to(x.dtype), Z


@_forward.register_fake
def _(x, U, V, C, bias):
    return x.new_empty(x.shape[0], U.shape[0]), x.new_empty(x.shape[0], V.shape[1], dtype=C.dtype)


@torch.library.custom_op("salt_contract_test::backward", mutates_args=())
def _backward(G: torch.Tensor, Z: torch.Tensor, U: torch.Tensor, V: torch.Tensor, C: torch.Tensor,
              need_dx: bool, need_dC: bool, need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = C.dtype
    dT = G.to(acc) @ U.to(acc)
    dx = ((dT @ C) @ V.to(acc).t()).to(G.dtype) if need_dx else G.new_empty(0)
    dC = dT.t() @ Z if need_dC else C.new_empty(0)
    db = G.to(acc).sum(0).to(G.dtype) if need_db else G.new_empty(0)
    return dx, dC, db


@_backward.register_fake
def _(G, Z, U, V, C, need_dx, need_dC, need_db):
    M, K, r = G.shape[0], V.shape[0], C.shape[0]
    return (G.new_empty(M, K) if need_dx else G.new_empty(0),
            C.new_empty(r, r) if need_dC else C.new_empty(0),
            G.new_empty(G.shape[1]) if need_db else G.new_empty(0))


register_salt_autograd(_forward, _backward)


def _fn(**kw):
    x = kw.pop("x")
    scaling = kw.pop("scaling")
    lead = x.shape[:-1]
    y = run_salt_op(_forward, x.reshape(-1, x.shape[-1]), kw["U"], kw["V"], kw["sigma"], kw["X"],
                    kw["Y"], kw["bias"], scaling)
    return y.reshape(*lead, -1)


@pytest.mark.parametrize("grad_basis", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_contract_gradients(grad_basis, bias):
    t = make_salt_inputs((3, 4), 13, 11, 5, 2, torch.float32, bias=bias, grad_basis=grad_basis)
    assert_matches_ground_truth(_fn, t, torch.float32, scaling=0.8)


def test_only_requested_gradients_computed():
    t = make_salt_inputs((6,), 9, 7, 4, 2, torch.float32)
    t["x"].requires_grad_(False)
    y = _fn(**t, scaling=1.0)
    y.sum().backward()
    assert t["x"].grad is None and t["sigma"].grad is not None


def test_opcheck_contract_ops():
    t = make_salt_inputs((5,), 9, 7, 4, 2, torch.float32)
    x, U, V = (t[n].detach() for n in ("x", "U", "V"))
    C = torch.randn(4, 4, requires_grad=True)
    torch.library.opcheck(_forward, (x.requires_grad_(), U, V, C, t["bias"].detach()))


def test_backward_inside_autocast_sees_forward_dtypes():
    """salt_linear runs a kernel op's forward with autocast off (inputs already cast); a
    backward called inside the torch.autocast block must run the same way, not with
    autocast re-casting the backward op's GEMMs (the C++ extension's backward crashed
    on mixed dtypes that way). Here the forward is fp32: a backward op re-cast to bf16
    misses the fp32 tolerance for dx and dsigma, which come straight from the backward
    op. dX, dY pass through the autograd of C = diag(sigma) + s X Y, plain torch ops that
    autocast re-casts in any backward run inside it (PyTorch advises against that), so
    they are held to the bf16 tolerance."""
    t = make_salt_inputs((6,), 12, 9, 4, 2, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            y = _fn(**t, scaling=0.5)
        grads = torch.autograd.grad(y.sum(), [t["x"], t["sigma"], t["X"], t["Y"], t["bias"]])
    _, grads_ref = ground_truth(t, torch.ones(y.shape, dtype=torch.float64), 0.5)
    for name, g in zip(["x", "sigma", "X", "Y", "bias"], grads):
        assert g.dtype == t[name].dtype, name
        tol = TOLERANCES[torch.bfloat16 if name in ("X", "Y") else torch.float32]
        assert max_rel_err(g, grads_ref[name]) <= tol, name
