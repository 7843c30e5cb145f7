"""salt_kernels.warmup: runs every SALT layer at each token count (forward and backward,
with and without an input gradient) without touching the model's gradients, so that a
CUDA graph captured afterwards never autotunes or compiles (the GPU test captures one)."""

import pytest
import torch
from torch import nn

import salt_kernels
from salt_kernels.ops.dispatch import unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = unavailable_reason("triton", DEVICE)
needs_triton = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable on {DEVICE}: {REASON}")


def _model(backend="triton", dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(salt_kernels.SALTLinear(24, 72, 6, 2, backend=backend),
                          nn.GELU(),
                          salt_kernels.SALTLinear(72, 68, 66, 4, backend=backend))  # r > 64: the mix kernel
    with torch.no_grad():
        for m in model:
            if isinstance(m, salt_kernels.SALTLinear):
                m.Y.normal_()
    return model.to(device=DEVICE, dtype=dtype)


@needs_triton
def test_warmup_runs_every_layer_at_every_token_count(monkeypatch):
    from salt_kernels.backends.triton import kernels as tk

    calls = []
    fwd, bwd = tk.forward_launches, tk.backward_launches

    def spy_fwd(x, *a):
        calls.append(("fwd", x.shape[0], x.shape[1]))
        return fwd(x, *a)

    def spy_bwd(G, Z, U, V, C, need_dx, *a):
        calls.append(("bwd", G.shape[0], V.shape[0], need_dx))
        return bwd(G, Z, U, V, C, need_dx, *a)

    monkeypatch.setattr(tk, "forward_launches", spy_fwd)
    monkeypatch.setattr(tk, "backward_launches", spy_bwd)
    monkeypatch.setattr(tk, "LIST_LAUNCHES", True)  # every call through the planners
    model = _model()
    assert salt_kernels.warmup(model, token_counts=[3, 40]) == 2
    for K in (24, 72):
        for M in (3, 40):
            assert calls.count(("fwd", M, K)) == 2  # with and without an input gradient
            assert ("bwd", M, K, True) in calls and ("bwd", M, K, False) in calls
    assert all(p.grad is None for p in model.parameters())  # torch.autograd.grad: nothing accumulated
    calls.clear()
    salt_kernels.warmup(model[2], token_counts=[5], backward=False)
    assert calls == [("fwd", 5, 72)]


def test_warmup_validates_its_arguments():
    layer = salt_kernels.SALTLinear(8, 8, 2, 1, backend="reference")
    with pytest.raises(TypeError, match="model_or_layer"):
        salt_kernels.warmup([layer], [4])
    with pytest.raises(ValueError, match="token_counts"):
        salt_kernels.warmup(layer, [])
    with pytest.raises(ValueError, match="token_counts"):
        salt_kernels.warmup(layer, [4, 0])
    with pytest.raises(TypeError, match="dtype"):
        salt_kernels.warmup(layer, [4], dtype=torch.int32)


def test_warmup_under_autocast_dtype():
    """dtype other than the weights': the layers run under autocast (reference backend on CPU)."""
    layer = salt_kernels.SALTLinear(8, 6, 3, 1, backend="reference")
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    salt_kernels.warmup(layer, [4], dtype=torch.bfloat16)
    assert seen and set(seen) == {torch.bfloat16}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_capture_after_warmup(dtype):
    """Warm up, capture a forward + backward in a CUDA graph, replay on new data: matches
    eager. Capturing a token count that was not warmed up raises NotWarmedUpError."""
    from salt_kernels.backends.triton.kernels import NotWarmedUpError

    model = _model(dtype=dtype)
    M = 37
    salt_kernels.warmup(model, [M])
    params = [p for p in model.parameters() if p.requires_grad]
    static_x = torch.randn(M, 24, device="cuda", dtype=dtype, requires_grad=True)
    static_g = torch.randn(M, 68, device="cuda", dtype=dtype)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # the usual side-stream warm-up iteration before capture
        torch.autograd.grad(model(static_x), [static_x, *params], static_g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_grads = torch.autograd.grad(static_y, [static_x, *params], static_g)
    for seed in range(2):
        torch.manual_seed(seed)
        static_x.data.copy_(torch.randn_like(static_x))
        static_g.copy_(torch.randn_like(static_g))
        graph.replay()
        x = static_x.detach().clone().requires_grad_(True)
        y = model(x)
        grads = torch.autograd.grad(y, [x, *params], static_g)
        assert torch.equal(static_y, y)
        for a, b in zip(static_grads, grads):
            assert torch.equal(a, b)
    with pytest.raises(NotWarmedUpError, match="warmup"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            model(torch.randn(5000, 24, device="cuda", dtype=dtype))
