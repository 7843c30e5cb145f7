"""torch.compile with dynamic shapes: one graph serves every token count.

A variable-length fine-tuning run feeds a new number of tokens M at nearly every step.
If anything on the traced path (validation, dispatch, the layer, an op's fake kernel)
reads a size or a float as a Python number, Dynamo specialises on it and recompiles
for every new M, then falls back to eager at the recompile limit. These tests compile
a SALT layer with ``fullgraph=True`` (a graph break is an error), once with
``dynamic=True`` and once with ``torch._dynamo.mark_dynamic``, run forward and backward
at six token counts, and check that there was exactly one compile and that the results
match eager, on every backend available here (reference, the C++ extension, Triton under
the interpreter on CPU; on a CUDA machine the cuda device too).

M starts at 2: Dynamo specialises sizes 0 and 1 by design (a new graph for those is
torch's policy, not ours).
"""

import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import salt_kernels
from salt_kernels import SALTLinear
from salt_kernels.ops.dispatch import unavailable_reason
from salt_testing import TOLERANCES

TOKEN_COUNTS = (2, 3, 5, 8, 13, 37)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

def _case_list():
    for device in DEVICES:
        for backend in ("reference", "cpu", "cuda", "triton"):
            if backend in ("cpu", "cuda") and backend != device:
                continue
            yield pytest.param(backend, device, id=f"{backend}-{device}")


def _cases():
    return list(_case_list())


def _require(backend, device):
    reason = unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(f"backend '{backend}' unavailable on {device}: {reason}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _layer(backend, device, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    layer = SALTLinear(24, 20, 6, 3, backend=backend, device=device, dtype=dtype, scaling=0.7, **kw)
    with torch.no_grad():  # away from init: X @ Y and the residual non-zero
        layer.Y.normal_()
        if layer.residual_weight is not None:
            layer.residual_weight.normal_(std=0.05)
    return layer


def _run(fn, layer, x, grad_out, mark_dynamic=False):
    """Forward and backward; returns y and the gradients of x and every parameter."""
    x = x.detach().requires_grad_(True)
    if mark_dynamic:  # every leading dim: the token count(s)
        for d in range(x.dim() - 1):
            torch._dynamo.mark_dynamic(x, d)
    params = [p for p in layer.parameters() if p.requires_grad]
    y = fn(x)
    grads = torch.autograd.grad(y, [x] + params, grad_out)
    return y.detach(), grads


def _graphs_with_ops(cnt):
    return sum(any(n.op == "call_function" for n in g.graph.nodes) for g in cnt.graphs)


def _assert_one_graph_matching_eager(layer, inputs, *, mark_dynamic, dtype, compiler="aot_eager"):
    cnt = CompileCounterWithBackend(compiler)
    compiled = torch.compile(layer, fullgraph=True, backend=cnt, dynamic=None if mark_dynamic else True)
    tol = TOLERANCES[dtype]
    frames_after_first = None
    for x in inputs:
        g = torch.Generator().manual_seed(x.shape[0])
        grad_out = torch.randn((*x.shape[:-1], layer.out_features), generator=g).to(dtype).to(x.device)
        y_c, grads_c = _run(compiled, layer, x, grad_out, mark_dynamic)
        y_e, grads_e = _run(layer, layer, x, grad_out)
        torch.testing.assert_close(y_c, y_e, rtol=tol, atol=tol)
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=tol, atol=tol)
        if frames_after_first is None:
            frames_after_first = cnt.frame_count
    shapes = [tuple(x.shape) for x in inputs]
    assert cnt.frame_count == frames_after_first, f"recompiled for {shapes}: {cnt.frame_count} frames"
    assert _graphs_with_ops(cnt) == 1, f"{_graphs_with_ops(cnt)} graphs for {shapes}"
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("mark_dynamic", [False, True], ids=["dynamic", "mark_dynamic"])
@pytest.mark.parametrize("backend,device", _cases())
def test_one_graph_for_every_token_count(backend, device, mark_dynamic):
    _require(backend, device)
    dtype = torch.float32
    layer = _layer(backend, device, dtype)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(M, 24, generator=g).to(device) for M in TOKEN_COUNTS]
    _assert_one_graph_matching_eager(layer, inputs, mark_dynamic=mark_dynamic, dtype=dtype)


@pytest.mark.parametrize("residual", [False, True], ids=["lowrank", "residual"])
@pytest.mark.parametrize("backend,device", _cases())
def test_leading_batch_dims(backend, device, residual):
    """x (B, T, K) with both B and T varying: the reshape to (B*T, K) stays symbolic."""
    _require(backend, device)
    dtype = torch.float32
    layer = _layer(backend, device, dtype, residual=residual)
    g = torch.Generator().manual_seed(2)
    shapes = [(2, 3), (3, 5), (4, 2), (2, 9), (5, 7), (3, 3)]
    inputs = [torch.randn(B, T, 24, generator=g).to(device) for B, T in shapes]
    _assert_one_graph_matching_eager(layer, inputs, mark_dynamic=False, dtype=dtype)


@pytest.mark.parametrize("backend,device", _cases())
def test_half_precision_and_autocast(backend, device):
    """bf16 layer, and an fp32 layer under autocast(bf16): dispatch's dtype handling traced."""
    _require(backend, device)
    dtype = torch.bfloat16
    layer = _layer(backend, device, dtype)
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(M, 24, generator=g).to(dtype).to(device) for M in TOKEN_COUNTS[:4]]
    _assert_one_graph_matching_eager(layer, inputs, mark_dynamic=False, dtype=dtype)

    torch._dynamo.reset()
    counters.clear()
    layer32 = _layer(backend, device, torch.float32)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer32, fullgraph=True, backend=cnt, dynamic=True)
    for M in TOKEN_COUNTS[:4]:
        x = torch.randn(M, 24, generator=g).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            y_c, y_e = compiled(x), layer32(x)
        assert y_c.dtype == torch.bfloat16
        torch.testing.assert_close(y_c, y_e, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype])
    assert counters["stats"]["unique_graphs"] == 1


def test_scaling_change_does_not_recompile():
    """scaling is traced as a symbolic float: a new value reuses the graph, with the new
    value's result."""
    layer = _layer("reference", "cpu")
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=cnt, dynamic=True)
    x = torch.randn(5, 24)
    compiled(x)
    frames = cnt.frame_count
    layer.scaling = -1.9
    torch.testing.assert_close(compiled(x), layer(x))
    assert cnt.frame_count == frames


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_scaling_rejected(bad):
    """Eagerly a clear ValueError; compiled (fullgraph), the traced check fails the
    graph's guard on scaling and re-tracing reports the same message."""
    layer = _layer("reference", "cpu")
    x = torch.randn(4, 24)
    with pytest.raises(ValueError, match="scaling: expected a finite number"):
        salt_kernels.salt_linear(x, layer.U, layer.V, layer.sigma, layer.X, layer.Y, scaling=bad)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    compiled(x)
    layer.scaling = bad
    # (NaN: sympy refuses to compare a NaN, so Dynamo reports that, at the same check)
    with pytest.raises(Exception, match="scaling: expected a finite number" if bad == bad else
                       r"Invalid NaN comparison[\s\S]*abs\(scaling\)"):
        compiled(x)
    with pytest.raises(TypeError, match="scaling: expected a Python float"):
        salt_kernels.salt_linear(x, layer.U, layer.V, layer.sigma, layer.X, layer.Y, scaling=1j)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_inductor_one_graph(backend):
    """The real compiler (inductor, C++ codegen on CPU), forward and backward."""
    _require(backend, "cpu")
    layer = _layer(backend, "cpu")
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(M, 24, generator=g) for M in TOKEN_COUNTS]
    _assert_one_graph_matching_eager(layer, inputs, mark_dynamic=False, dtype=torch.float32,
                                     compiler="inductor")


@pytest.mark.parametrize("backend,device", _cases())
def test_salt_linear_function_all_inputs_dynamic(backend, device):
    """salt_linear itself compiled, every tensor an input: with dynamic=True the rank is a
    symbolic size too, and backend resolution (keyed on it) must not break the graph."""
    _require(backend, device)
    from salt_testing import make_salt_inputs

    cnt = CompileCounterWithBackend("aot_eager")

    def f(**kw):
        return salt_kernels.salt_linear(**kw, scaling=0.5, backend=backend)

    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend=cnt)
    frames = None
    for M in TOKEN_COUNTS:  # no M equals a layer size (duck sizing would tie them)
        t = make_salt_inputs((M,), 25, 21, 7, 4, device=device, seed=M)
        y_c = compiled(**t)
        grads_c = torch.autograd.grad(y_c.sum(), [t[n] for n in ("x", "sigma", "X", "Y", "bias")])
        y_e = f(**t)
        grads_e = torch.autograd.grad(y_e.sum(), [t[n] for n in ("x", "sigma", "X", "Y", "bias")])
        torch.testing.assert_close(y_c, y_e)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b)
        frames = cnt.frame_count if frames is None else frames
    assert cnt.frame_count == frames


@pytest.mark.parametrize("backend,device", _cases())
def test_mixed_adapter_batch_one_graph(backend, device):
    """A mixed-adapter call (bank of 4 adapters, base rows -1, banked bias) compiled with
    dynamic=True: one graph for every token count, forward and every gradient as eager."""
    _require(backend, device)
    g = torch.Generator().manual_seed(5)
    K, D, r, rl, A = 24, 20, 6, 3, 4

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    U, V = rnd(D, r, grad=False), rnd(K, r, grad=False)
    bank = dict(sigma=rnd(A, r), X=rnd(A, r, rl), Y=rnd(A, rl, r), bias=rnd(A, D), base_sigma=rnd(r),
                base_bias=rnd(D))

    def f(x, index):
        return salt_kernels.salt_linear(x, U, V, bank["sigma"], bank["X"], bank["Y"], bank["bias"], scaling=0.7,
                                        backend=backend, adapter_index=index, base_sigma=bank["base_sigma"],
                                        base_bias=bank["base_bias"])

    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=cnt, dynamic=True)
    tol = TOLERANCES[torch.float32]
    frames_after_first = None
    for M in TOKEN_COUNTS:
        x = rnd(M, K)
        index = torch.randint(-1, A, (M,), generator=g).to(device)
        grad_out = rnd(M, D, grad=False)
        wrt = [x, *bank.values()]
        y_c, y_e = compiled(x, index), f(x, index)
        torch.testing.assert_close(y_c, y_e, rtol=tol, atol=tol)
        for gc, ge in zip(torch.autograd.grad(y_c, wrt, grad_out), torch.autograd.grad(y_e, wrt, grad_out)):
            torch.testing.assert_close(gc, ge, rtol=tol, atol=tol)
        if frames_after_first is None:
            frames_after_first = cnt.frame_count
    assert cnt.frame_count == frames_after_first, f"recompiled: {cnt.frame_count} frames"
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend,device", _cases())
def test_mixed_adapter_bad_index_fails_in_the_graph(backend, device):
    """Compiled for inference (no gradients: the Triton multi-adapter op itself), the
    result equals eager, and the index range is checked inside the graph (no host read): a
    -1 row without base_sigma, or an index past the bank, raises instead of picking a
    wrong row. The failing calls run on the CPU only: on CUDA the in-graph check is a
    device-side assert, which ends the process's CUDA context (every later CUDA test in
    the run would fail)."""
    _require(backend, device)
    K, D, r, rl, A = 12, 10, 6, 3, 4
    U, V = torch.randn(D, r, device=device), torch.randn(K, r, device=device)
    sigma, X, Y = (torch.rand(A, r, device=device), torch.randn(A, r, rl, device=device),
                   torch.randn(A, rl, r, device=device))
    compiled = torch.compile(lambda x, i: salt_kernels.salt_linear(x, U, V, sigma, X, Y, None, backend=backend,
                                                                   adapter_index=i),
                             fullgraph=True, dynamic=True, backend="aot_eager")
    x = torch.randn(5, K, device=device)
    good = torch.tensor([0, 1, 2, 3, 0], device=device)
    torch.testing.assert_close(compiled(x, good), salt_kernels.salt_linear(x, U, V, sigma, X, Y, None, backend=backend,
                                                                           adapter_index=good))
    if device != "cpu":
        return
    for bad in ([0, 1, -1, 3, 0], [0, 4, 2, 3, 0]):
        with pytest.raises(RuntimeError, match=r"adapter_index: expected values in \[0, 4\)"):
            compiled(x, torch.tensor(bad, device=device))
