"""SALTLinear: construction, from_linear, to_linear, state_dict, repr."""

import pytest
import torch
from torch import nn

from salt_kernels import SALTLinear, truncated_svd

DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("svd", ["exact", "lowrank"])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_full_rank_reproduces_linear(svd, bias):
    torch.manual_seed(0)
    lin = nn.Linear(37, 23, bias=bias)
    layer = SALTLinear.from_linear(lin, 23, 4, svd=svd)
    x = torch.randn(3, 5, 37)
    assert _rel(layer(x), lin(x)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_init_equals_truncated_svd(dtype):
    torch.manual_seed(1)
    lin = nn.Linear(40, 30).to(dtype)
    r = 7
    layer = SALTLinear.from_linear(lin, r, 3)
    assert layer.U.dtype == dtype and layer.sigma.dtype == dtype
    assert torch.count_nonzero(layer.X @ layer.Y) == 0 and torch.count_nonzero(layer.X) > 0
    W = lin.weight.double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    W_r = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    x = torch.randn(6, 40, dtype=torch.float64)
    expect = x @ W_r.t() + lin.bias.double()
    assert _rel(layer(x.to(dtype)), expect) < DTYPE_TOL[dtype]
    assert _rel(layer.merged_weight(), W_r) < DTYPE_TOL[dtype]


def test_svd_is_deterministic_in_sign():
    torch.manual_seed(2)
    W = torch.randn(20, 12)
    U1, S1, V1 = truncated_svd(W, 5)
    U2, S2, V2 = truncated_svd(-(-W), 5, "lowrank")
    # same sign convention from two different algorithms
    assert torch.allclose(U1, U2, atol=1e-4) and torch.allclose(V1, V2, atol=1e-4)
    idx = U1.abs().argmax(0)
    assert (U1[idx, torch.arange(5)] > 0).all()


def test_lowrank_svd_close_to_exact_for_low_rank_weight():
    torch.manual_seed(3)
    W = torch.randn(200, 8) @ torch.randn(8, 150)
    lin = nn.Linear(150, 200)
    with torch.no_grad():
        lin.weight.copy_(W)
    a = SALTLinear.from_linear(lin, 8, 2, svd="lowrank")
    assert _rel(a.merged_weight(), W) < 1e-4


def test_to_linear_equals_layer():
    torch.manual_seed(4)
    layer = SALTLinear(25, 18, 9, 4, scaling=0.5)
    with torch.no_grad():
        layer.Y.normal_()
        layer.sigma.add_(0.3)
    lin = layer.to_linear()
    assert isinstance(lin, nn.Linear) and lin.weight.dtype == torch.float32
    x = torch.randn(4, 25)
    assert _rel(lin(x), layer(x)) < 1e-5


def test_to_linear_half_merges_in_fp32():
    torch.manual_seed(5)
    layer = SALTLinear(64, 48, 16, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.Y.normal_()
    lin = layer.to_linear()
    assert lin.weight.dtype == torch.bfloat16
    exact = (layer.U.double() @ (torch.diag(layer.sigma.double()) + layer.X.double() @ layer.Y.double())
             @ layer.V.double().t())
    # one rounding to bf16 at the end: error at most half an ulp of bf16 relative (2^-9)
    assert ((lin.weight.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()


def test_state_dict_round_trip():
    torch.manual_seed(6)
    a = SALTLinear(20, 10, 6, 2)
    with torch.no_grad():
        a.Y.normal_()
    sd = a.state_dict()
    assert set(sd) == {"U", "V", "sigma0", "sigma", "X", "Y", "bias"}
    b = SALTLinear(20, 10, 6, 2)
    b.load_state_dict(sd)
    x = torch.randn(3, 20)
    assert torch.equal(a(x), b(x))


def test_parameters_and_buffers():
    layer = SALTLinear(20, 10, 6, 2)
    # U, V are frozen parameters (FSDP2 shards parameters, not buffers)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"sigma", "X", "Y", "bias"}
    assert {n for n, p in layer.named_parameters() if not p.requires_grad} == {"U", "V"}
    assert {n for n, _ in layer.named_buffers()} == {"sigma0"}
    assert set(layer.state_dict()) == {"U", "V", "sigma0", "sigma", "X", "Y", "bias"}
    assert torch.allclose(layer.U.t() @ layer.U, torch.eye(6), atol=1e-5)
    no_bias = SALTLinear(20, 10, 6, 0, bias=False)
    assert no_bias.bias is None and no_bias.X.shape == (6, 0)
    assert no_bias(torch.randn(2, 20)).shape == (2, 10)


def test_repr_shows_sizes():
    text = repr(SALTLinear(20, 10, 6, 2))
    for part in ["in_features=20", "out_features=10", "rank=6", "lora_rank=2", "bias=True"]:
        assert part in text


def test_default_init_scale_like_linear():
    torch.manual_seed(7)
    layer = SALTLinear(256, 256, 256, 8)
    x = torch.randn(512, 256)
    ratio = layer(x).std() / nn.Linear(256, 256)(x).std()
    assert 0.5 < ratio < 2.5


def test_lora_rank_zero_trains_sigma_only():
    torch.manual_seed(8)
    layer = SALTLinear.from_linear(nn.Linear(12, 9), 5, 0)
    y = layer(torch.randn(3, 12)).sum()
    y.backward()
    assert layer.sigma.grad is not None and layer.sigma.grad.abs().sum() > 0
    assert layer.X.numel() == 0 and layer.Y.numel() == 0


def _layer_product(layer, x, sigma, X, Y, bias):
    """The layer's output in float64 from the given tensors and its basis."""
    core = torch.diag(sigma.double()) + layer.scaling * X.double() @ Y.double()
    y = x.double() @ layer.V.double() @ core.t() @ layer.U.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("name", ["sigma", "X", "Y", "bias"])
def test_forward_sees_parametrizations(name):
    """A parametrization moves a tensor out of the layer's parameters into a property: the
    forward (which reads its tensors from the parameters) must then use the property."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, t):
            return 2 * t

    torch.manual_seed(9)
    layer = SALTLinear(19, 13, 7, 3, scaling=0.5)
    with torch.no_grad():
        layer.Y.normal_()
    parametrize.register_parametrization(layer, name, Doubled())
    x = torch.randn(5, 19)
    tensors = {n: getattr(layer, n) for n in ("sigma", "X", "Y", "bias")}
    assert torch.equal(tensors[name], 2 * getattr(layer.parametrizations, name).original)
    expect = _layer_product(layer, x, **tensors)
    assert (layer(x).double() - expect).abs().max() < 1e-5 * expect.abs().max()


def test_forward_under_functional_call():
    """torch.func.functional_call swaps tensors into the layer for one call; the forward
    uses them, and the layer's own are back afterwards."""
    torch.manual_seed(10)
    layer = SALTLinear(19, 13, 7, 3)
    x = torch.randn(5, 19)
    swapped = {"sigma": torch.rand(7) + 1, "X": torch.randn(7, 3), "Y": torch.randn(3, 7), "bias": torch.randn(13)}
    y = torch.func.functional_call(layer, swapped, (x,))
    expect = _layer_product(layer, x, **swapped)
    assert (y.double() - expect).abs().max() < 1e-5 * expect.abs().max()
    own = _layer_product(layer, x, layer.sigma, layer.X, layer.Y, layer.bias)
    assert (layer(x).double() - own).abs().max() < 1e-5 * own.abs().max()
