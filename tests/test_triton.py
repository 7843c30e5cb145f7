"""The triton backend beyond what test_salt_linear.py covers: every rank from 1 to 256 with
r' from 0 to r, both launch plans (split shrink at small M, unsplit at large M), M = 0/1,
large odd K/D, transposed x and G, stride-0 G, needs_input_grad, determinism, opcheck
and torch.compile (the ahead-of-time compile check is tests/test_aot.py).

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so
the kernels run on CPU tensors in the Triton interpreter. The interpreter's tl.dot is
wrong on bfloat16 operands (triton issue 11584): there, and only there, the kernels
upcast bf16 dot operands to fp32 (``UPCAST_DOT``; bf16 x bf16 products are exact in
fp32, so the math is the same). With a GPU the same tests run the compiled kernels.
"""

import os
import subprocess
import sys

import pytest
import torch

import salt_kernels
from salt_kernels.ops.dispatch import unavailable_reason
from salt_testing import TOLERANCES, assert_matches_ground_truth, make_salt_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable on {DEVICE}: {REASON}")

if REASON is None:
    from salt_kernels.backends.triton import kernels as tk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def fn(**kw):
    return salt_kernels.salt_linear(**kw, backend="triton")


@pytest.fixture(params=["by_size", "split3"])
def plan(request, monkeypatch):
    """Run under both launch plans: the size heuristic (unsplit at these small K/D with the
    interpreter's 4 'SMs', split for large K/D) and a forced 3-way split of K / D."""
    monkeypatch.setattr(tk, "FORCE_SPLIT", None if request.param == "by_size" else 3)
    return request.param


# r from 1 to 256, r' from 0 to r: powers of two and not, the r <= 64 prologue-mix
# path and the r > 64 mix kernel, r = 256 (R_PAD = 256, BM capped at 32).
RANKS = [(1, 0), (1, 1), (16, 5), (33, 0), (33, 33), (64, 17), (65, 64), (128, 128), (200, 7), (256, 0), (256, 256)]


@pytest.mark.parametrize("rank", RANKS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranks(rank, dtype, plan):
    r, rl = rank
    K, D = max(r + 5, 45), max(r + 3, 37)  # rank up to min(K, D); odd, not block multiples
    t = make_salt_inputs((3, 2), K, D, r, rl, dtype, device=DEVICE, seed=r)
    assert_matches_ground_truth(fn, t, dtype, scaling=0.6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_odd_features(dtype, plan):
    """K, D not multiples of any block, several row blocks (M = 70 > BM = 64)."""
    t = make_salt_inputs((70,), 1031, 517, 48, 12, dtype, device=DEVICE)
    assert_matches_ground_truth(fn, t, dtype, scaling=1.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_row_decode(dtype):
    """M = 1 with a long K: the size heuristic splits the shrink over K by itself, and the
    split's 24 values are summed in one level whose programs loop over several tiles of
    partials, the last one partly masked."""
    t = make_salt_inputs((1,), 1500, 300, 24, 8, dtype, device=DEVICE)
    BM, split, _ = tk._plan(1, 1500, 32, t["x"].element_size())
    assert split > tk._SUM_ROWS and split % tk._SUM_ROWS and BM == 16
    assert tk.sum_levels(split, 24) == [(split, 4, 1, 1)]
    assert_matches_ground_truth(fn, t, dtype)


@pytest.mark.parametrize("r", [8, 100])
def test_empty_batch(r, plan):
    t = make_salt_inputs((0,), 130, 120, r, 3, torch.float32, device=DEVICE)
    y = fn(**t, scaling=1.0)
    assert y.shape == (0, 120)
    y.sum().backward()
    assert torch.all(t["sigma"].grad == 0) and torch.all(t["bias"].grad == 0)
    assert t["x"].grad.shape == (0, 130)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [12, 90])
def test_transposed_x_and_grad(dtype, r, plan):
    """x and the upstream gradient stored transposed (stride (1, M)): no copy is needed."""
    t = make_salt_inputs((19,), 131, 77, r, 5, dtype, device=DEVICE)
    xt = t["x"].detach().t().contiguous().t().requires_grad_(True)
    assert xt.stride() == (1, 19)
    t["x"] = xt
    assert_matches_ground_truth(fn, t, dtype)
    # the op itself reads the strided tensors (no hidden .contiguous() in the launcher)
    x, U, V = xt.detach(), t["U"], t["V"]
    C = torch.randn(r, r, dtype=torch.float32, device=DEVICE)
    y, Z = tk.salt_forward(x, U, V, C, None)
    G = torch.randn(77, 19, dtype=torch.float64, device=DEVICE).to(dtype).t()
    dx, dC, _ = tk.salt_backward(G, Z, U, V, C, True, True, False)
    acc = torch.float64
    Z64 = x.to(acc) @ V.to(acc)
    dT = G.to(acc) @ U.to(acc)
    tol = TOLERANCES[dtype]
    for got, ref in [(y, Z64 @ C.to(acc).t() @ U.to(acc).t()), (Z, Z64), (dC, dT.t() @ Z64),
                     (dx, dT @ C.to(acc) @ V.to(acc).t())]:
        err = (got.to(acc) - ref).abs().max() / ref.abs().max()
        assert err <= tol, err


@pytest.mark.parametrize("r", [10, 80])
def test_stride_zero_grad(r, plan):
    """G from y.sum() is an expanded scalar (strides 0, 0)."""
    t = make_salt_inputs((4, 6), 50, 41, r, 4, torch.float32, device=DEVICE)
    y = fn(**t, scaling=0.9)
    y.sum().backward()
    ref = {k: (None if v is None else v.detach().clone().requires_grad_(v.requires_grad)) for k, v in t.items()}
    salt_kernels.salt_linear(**ref, scaling=0.9, backend="reference").sum().backward()
    for name in ("x", "sigma", "X", "Y", "bias"):
        torch.testing.assert_close(t[name].grad, ref[name].grad, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("frozen", [("x",), ("sigma", "X", "Y"), ("x", "bias"), ("x", "sigma", "X", "Y")])
@pytest.mark.parametrize("r", [9, 72])
def test_only_needed_gradients(frozen, r, plan):
    """ctx.needs_input_grad: frozen inputs get no gradient, the others are still right
    (exercises the dx-only, dC-only and db-only kernel paths)."""
    t = make_salt_inputs((13,), 40, 35, r, 3, torch.float32, device=DEVICE)
    for name in frozen:
        t[name].requires_grad_(False)
    assert_matches_ground_truth(fn, t, torch.float32)
    y = fn(**t, scaling=1.0)
    y.backward(torch.randn_like(y))
    for name in frozen:
        assert t[name].grad is None


@pytest.mark.parametrize("r", [20, 150])
def test_backward_is_deterministic(r, plan):
    """Two backward passes give bitwise identical gradients (fixed-order partial sums)."""
    t = make_salt_inputs((70,), 200, 150, r, 6, torch.float32, device=DEVICE)
    G = torch.randn(70, 150, device=DEVICE)
    grads = []
    for _ in range(2):
        y = fn(**t, scaling=1.0)
        grads.append(torch.autograd.grad(y, [t[n] for n in ("x", "sigma", "X", "Y", "bias")], G))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_opcheck_ops(plan):
    t = make_salt_inputs((7,), 33, 29, 6, 2, torch.float32, device=DEVICE)
    x, U, V, b = (t[n].detach() for n in ("x", "U", "V", "bias"))
    C = torch.randn(6, 6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(tk.salt_forward, (x.clone().requires_grad_(), U, V, C, b))
    torch.library.opcheck(tk.salt_forward, (x, U, V, C.detach(), None))
    G, Z = torch.randn(7, 29, device=DEVICE), torch.randn(7, 6, device=DEVICE)
    torch.library.opcheck(tk.salt_backward, (G, Z, U, V, C.detach(), True, True, True))
    torch.library.opcheck(tk.salt_backward, (G, Z, U, V, C.detach(), False, True, False))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through a SALTLinear with backend='triton'.
    The ops are opaque custom ops: their fake kernels are traced, and the compiled graph
    runs the real kernels (interpreted on CPU) at run time."""
    torch._dynamo.reset()
    layer = salt_kernels.SALTLinear(37, 23, 9, 3, backend="triton").to(DEVICE)
    with torch.no_grad():
        layer.Y.normal_()
        layer.sigma.uniform_(0.5, 1.5)
    compiled = torch.compile(layer, fullgraph=True)
    t = dict(x=torch.randn(4, 5, 37, device=DEVICE, requires_grad=True), U=layer.U, V=layer.V,
             sigma=layer.sigma, X=layer.X, Y=layer.Y, bias=layer.bias)

    def run(x, U, V, sigma, X, Y, bias, scaling):
        return compiled(x)

    assert_matches_ground_truth(run, t, torch.float32, scaling=layer.scaling)


def test_configs_pruned_never_empty():
    for kernel in ("shrink", "expand"):
        for R_PAD in (16, 32, 64, 128, 256):
            for M in (1, 16, 33, 64, 10_000):
                for elem in (2, 4):
                    BM = tk.block_m(M, R_PAD, elem)
                    assert tk.usable_configs(kernel, BM, R_PAD, elem)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (auto picks triton only for CUDA tensors)")
def test_auto_picks_triton_on_cuda():
    from salt_kernels.ops.dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("value,autotuned", [("1", True), ("0", False)])
def test_autotune_switch(value, autotuned):
    """SALT_KERNELS_AUTOTUNE=0 launches the fixed default config (no autotuner). Checked in
    a compiled-mode process (the interpreter never autotunes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SALT_KERNELS_AUTOTUNE"] = value
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    code = ("import triton; from salt_kernels.backends.triton import kernels as tk; "
            "print(tk.AUTOTUNE, isinstance(tk._AUTOTUNED.get('shrink'), triton.runtime.Autotuner), "
            "isinstance(tk._AUTOTUNED.get('expand'), triton.runtime.Autotuner))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(autotuned)] * 3


def test_basis_with_a_non_unit_rank_stride_is_copied():
    """U/V reach the kernels with a unit rank stride: a contiguous basis passes through,
    any other view is copied (small: D x r), including one whose rank-axis stride would
    overflow the kernels' int32 rank offsets."""
    U = torch.randn(5, 3)
    assert tk.basis_for_kernels(U) is U
    Ut = U.t().contiguous().t()  # rank-axis stride 5
    assert tk.basis_for_kernels(Ut).stride() == (3, 1) and torch.equal(tk.basis_for_kernels(Ut), U)
    # a rank-axis stride of 2^30 (meta tensor: no 4 GB allocation) gets copied
    wide = torch.empty((2, 3), device="meta").as_strided((2, 3), (1, 2**30))
    assert tk.basis_for_kernels(wide).stride() == (3, 1)


@pytest.mark.parametrize("dtype,D,expected", [(torch.float32, 517, 16), (torch.float32, 512, 32),
                                              (torch.bfloat16, 517, 64), (torch.bfloat16, 512, 64)])
def test_fp32_expand_takes_16_rows_when_output_rows_are_unaligned(dtype, D, expected):
    """The expand's row tile: 16 for fp32 when D (forward) or K (dx) is not a multiple of
    16 (32 rows sat at 255 registers or spilled there, aot.py --full); otherwise the
    shrink's tile (which bf16's prologue mix must share)."""
    M, K, r = 4096, 1031 if D % 16 else 1024, 64
    x, G = torch.empty(M, K, dtype=dtype), torch.empty(M, D, dtype=dtype)
    U, V, C = torch.empty(D, r, dtype=dtype), torch.empty(K, r, dtype=dtype), torch.empty(r, r)
    _, Z, fwd = tk.forward_launches(x, U, V, C, None)
    *_, bwd = tk.backward_launches(G, Z, U, V, C, True, False, False)
    for launches in (fwd, bwd):
        (expand,) = [L for L in launches if L.name == "expand"]
        assert expand.kwargs["BM"] == expected
