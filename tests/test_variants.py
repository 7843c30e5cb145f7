"""The official-SALT variants: sigma_mode="scale_shift", residual (lossless) mode,
SALTConv2d and salt_regularizer -- against float64 ground truth, on every backend."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salt_kernels
from salt_kernels import SALTConv2d, SALTLinear, salt_regularizer
from salt_kernels.ops.dispatch import unavailable_reason
from salt_testing import TOLERANCES, assert_layer_matches_ground_truth, max_rel_err, perturb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton", "cpu", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["direct", "scale_shift"]


def _require(backend):
    reason = unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.skip(f"backend '{backend}' unavailable on {DEVICE}: {reason}")


def _linear(K, D, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, D, bias=bias).to(device=DEVICE, dtype=dtype)


# ----------------------------------------------------------------------------- SALTLinear

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sigma_mode", MODES)
@pytest.mark.parametrize("residual", [False, True], ids=["lowrank", "residual"])
@pytest.mark.parametrize("shape", [((2, 7), 33, 29, 5, 3, True), ((11,), 19, 40, 19, 0, False),
                                   ((), 12, 9, 4, 2, True), ((0, 3), 8, 6, 2, 1, True)], ids=str)
def test_linear_variants_match_float64(backend, dtype, sigma_mode, residual, shape):
    _require(backend)
    lead, K, D, r, rl, bias = shape
    layer = SALTLinear.from_linear(_linear(K, D, dtype, bias), r, rl, scaling=0.7, backend=backend,
                                   sigma_mode=sigma_mode, residual=residual)
    perturb(layer)
    x = torch.randn(*lead, K, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    assert_layer_matches_ground_truth(layer, x, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma_mode", MODES)
def test_linear_variants_noncontiguous_x(backend, sigma_mode):
    _require(backend)
    layer = perturb(SALTLinear.from_linear(_linear(20, 14), 6, 3, backend=backend,
                                           sigma_mode=sigma_mode, residual=True))
    x = torch.randn(3, 20, 9, device=DEVICE).transpose(1, 2)  # (3, 9, 20), strided
    assert not x.is_contiguous()
    assert_layer_matches_ground_truth(layer, x, torch.float32)


def test_scale_shift_parameters_and_init():
    lin = _linear(30, 20)
    layer = SALTLinear.from_linear(lin, 8, 4, sigma_mode="scale_shift")
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"alpha", "beta", "X", "Y", "bias"}
    assert {n for n, p in layer.named_parameters() if not p.requires_grad} == {"U", "V"}
    assert {n for n, _ in layer.named_buffers()} == {"sigma0"}
    assert torch.equal(layer.alpha, torch.ones_like(layer.alpha))
    assert torch.equal(layer.beta, torch.zeros_like(layer.beta))
    S = torch.linalg.svdvals(lin.weight.double())[:8]
    assert max_rel_err(layer.sigma0, S) < TOLERANCES[torch.float32]
    assert torch.equal(layer.effective_sigma(), layer.sigma0)
    direct = SALTLinear.from_linear(lin, 8, 4)
    x = torch.randn(5, 30, device=DEVICE)
    torch.testing.assert_close(layer(x), direct(x))
    with pytest.raises(ValueError, match="sigma_mode"):
        SALTLinear(4, 4, 2, 1, sigma_mode="scale")
    with pytest.raises(TypeError, match="residual"):
        SALTLinear(4, 4, 2, 1, residual=1)


def test_scale_shift_relu_clamps_at_zero():
    layer = SALTLinear(10, 8, 4, 0, sigma_mode="scale_shift")
    with torch.no_grad():
        layer.beta.copy_(torch.tensor([-100.0, 0.0, 0.0, -100.0]))
    s = layer.effective_sigma()
    assert s[0] == 0 and s[3] == 0 and (s[1:3] > 0).all()
    layer(torch.randn(3, 10)).sum().backward()
    assert layer.alpha.grad[0] == 0 and layer.beta.grad[3] == 0 and layer.beta.grad[1] != 0


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES], ids=str)
@pytest.mark.parametrize("rank", [1, 5, 24])
@pytest.mark.parametrize("sigma_mode", MODES)
def test_residual_is_lossless_at_init(dtype, rank, sigma_mode):
    lin = _linear(37, 24, dtype)
    layer = SALTLinear.from_linear(lin, rank, min(rank, 3), residual=True, sigma_mode=sigma_mode)
    assert layer.residual_weight.shape == (24, 37) and not layer.residual_weight.requires_grad
    x = torch.randn(4, 6, 37, dtype=torch.float64, device=DEVICE)
    expect = F.linear(x, lin.weight.double(), lin.bias.double())
    assert max_rel_err(layer(x.to(dtype)), expect) <= TOLERANCES[dtype]
    if rank < 24:  # without the residual the rank-r layer is far from the original
        plain = SALTLinear.from_linear(lin, rank, min(rank, 3), sigma_mode=sigma_mode)
        assert max_rel_err(plain(x.to(dtype)), expect) > 10 * TOLERANCES[dtype]


@pytest.mark.parametrize("sigma_mode", MODES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_to_linear_merges_variants(sigma_mode, residual, dtype):
    layer = perturb(SALTLinear.from_linear(_linear(26, 18, dtype), 6, 3, scaling=0.5,
                                           sigma_mode=sigma_mode, residual=residual))
    merged = layer.to_linear()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == dtype
    x = torch.randn(7, 26, dtype=dtype, device=DEVICE)
    assert max_rel_err(merged(x), layer(x).double()) <= TOLERANCES[dtype]
    # merged in fp32 and cast once: the dense weight equals the f64 formula to one rounding
    p = {n: t.double() for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t is not None}
    sig = p["sigma"] if sigma_mode == "direct" else torch.relu(p["alpha"] * p["sigma0"] + p["beta"])
    W = p["U"] @ (torch.diag(sig) + 0.5 * p["X"] @ p["Y"]) @ p["V"].t()
    if residual:
        W = W + p["residual_weight"]
    assert max_rel_err(merged.weight, W) <= TOLERANCES[dtype]


@pytest.mark.parametrize("sigma_mode", MODES)
@pytest.mark.parametrize("residual", [False, True])
def test_state_dict_round_trip_variants(sigma_mode, residual):
    a = perturb(SALTLinear.from_linear(_linear(20, 10), 6, 2, sigma_mode=sigma_mode, residual=residual))
    sd = a.state_dict()
    trained = {"sigma"} if sigma_mode == "direct" else {"alpha", "beta"}
    assert set(sd) == {"U", "V", "sigma0", "X", "Y", "bias"} | trained | ({"residual_weight"} if residual else set())
    b = SALTLinear(20, 10, 6, 2, sigma_mode=sigma_mode, residual=residual)
    b.load_state_dict(sd)
    x = torch.randn(3, 20, device=DEVICE)
    assert torch.equal(a(x), b(x))
    assert torch.equal(salt_regularizer(a), salt_regularizer(b))
    other = SALTLinear(20, 10, 6, 2, sigma_mode="direct" if sigma_mode != "direct" else "scale_shift")
    with pytest.raises(RuntimeError):
        other.load_state_dict(sd)  # a different parametrisation is not silently accepted


def test_residual_accumulates_into_the_salt_output(monkeypatch):
    """Lossless mode returns the SALT output itself, with W_res x added in place (bias
    already fused there): no second output-sized tensor."""
    import salt_kernels.nn.linear as layers_mod

    layer = SALTLinear.from_linear(_linear(16, 12), 4, 2, residual=True, backend="reference")
    produced, real = [], layers_mod.salt_linear

    def spy(*args, **kw):
        out = real(*args, **kw)
        produced.append(out.data_ptr())
        return out

    monkeypatch.setattr(layers_mod, "salt_linear", spy)
    x = torch.randn(5, 3, 16, device=DEVICE)
    y = layer(x)
    assert y.shape == (5, 3, 12) and produced == [y.data_ptr()]
    assert_layer_matches_ground_truth(layer, x, torch.float32)


# ----------------------------------------------------------------------------- SALTConv2d

CONV_CONFIGS = [  # (in, out, kernel, stride, padding, dilation, bias, rank, lora_rank)
    (3, 8, 3, 1, 1, 1, True, 5, 2),
    (5, 7, (3, 1), 2, (1, 0), 1, False, 7, 3),
    (4, 6, 5, (2, 1), 2, 2, True, 3, 3),
    (6, 9, 1, 1, 0, 1, True, 6, 0),       # 1x1 conv, full rank, sigma only
    (2, 4, 2, 1, "same", 1, True, 4, 1),  # even kernel, "same" padding
    (3, 5, 3, 1, "valid", 3, True, 2, 1),
]


def _conv(cfg, dtype=torch.float32, seed=0):
    cin, cout, k, s, p, d, bias, _, _ = cfg
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=str)
@pytest.mark.parametrize("sigma_mode", MODES)
@pytest.mark.parametrize("residual", [False, True], ids=["lowrank", "residual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_conv_matches_dense_conv_float64(cfg, sigma_mode, residual, dtype):
    conv = _conv(cfg, dtype)
    layer = perturb(SALTConv2d.from_conv2d(conv, cfg[7], cfg[8], scaling=0.8,
                                           sigma_mode=sigma_mode, residual=residual))
    x = torch.randn(2, cfg[0], 11, 10, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    assert_layer_matches_ground_truth(layer, x, dtype)


def test_conv_unbatched_input():
    cfg = CONV_CONFIGS[0]
    layer = perturb(SALTConv2d.from_conv2d(_conv(cfg), 5, 2))
    x = torch.randn(3, 8, 9, device=DEVICE)
    assert layer(x).shape == (8, 8, 9)
    assert_layer_matches_ground_truth(layer, x, torch.float32)


@pytest.mark.parametrize("cfg", CONV_CONFIGS[:3], ids=str)
def test_conv_full_rank_and_residual_reproduce_conv(cfg):
    conv = _conv(cfg)
    full = min(cfg[1], conv.weight[0].numel())
    x = torch.randn(2, cfg[0], 12, 9, device=DEVICE)
    expect = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                      conv.stride, conv.padding, conv.dilation)
    tol = TOLERANCES[torch.float32]
    assert max_rel_err(SALTConv2d.from_conv2d(conv, full, 1)(x), expect) <= tol
    for rank in (1, 2):
        assert max_rel_err(SALTConv2d.from_conv2d(conv, rank, 1, residual=True)(x), expect) <= tol
        assert max_rel_err(SALTConv2d.from_conv2d(conv, rank, 1)(x), expect) > 100 * tol


def test_conv_forward_never_builds_the_dense_kernel(monkeypatch):
    """Only the r shrink filters and the (out, r, 1, 1) expansion reach conv2d."""
    conv = _conv(CONV_CONFIGS[0])
    layer = perturb(SALTConv2d.from_conv2d(conv, 5, 2))
    seen, real = [], F.conv2d

    def spy(x, w, *args, **kw):
        seen.append(tuple(w.shape))
        return real(x, w, *args, **kw)

    monkeypatch.setattr(F, "conv2d", spy)
    layer(torch.randn(1, 3, 6, 6, device=DEVICE))
    assert seen == [(5, 3, 3, 3), (8, 5, 1, 1)]


@pytest.mark.parametrize("sigma_mode", MODES)
@pytest.mark.parametrize("residual", [False, True])
def test_to_conv2d_merges(sigma_mode, residual):
    cfg = CONV_CONFIGS[2]
    layer = perturb(SALTConv2d.from_conv2d(_conv(cfg), 3, 2, sigma_mode=sigma_mode, residual=residual))
    merged = layer.to_conv2d()
    assert isinstance(merged, nn.Conv2d)
    assert (merged.stride, merged.padding, merged.dilation) == (layer.stride, layer.padding, layer.dilation)
    x = torch.randn(2, 4, 13, 11, device=DEVICE)
    assert max_rel_err(merged(x), layer(x).double()) <= TOLERANCES[torch.float32]


def test_conv_state_dict_and_params():
    layer = perturb(SALTConv2d.from_conv2d(_conv(CONV_CONFIGS[0]), 5, 2, residual=True))
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"sigma", "X", "Y", "bias"}
    assert {n for n, p in layer.named_parameters() if not p.requires_grad} == {"U", "V", "residual_weight"}
    assert layer.V.shape == (27, 5) and layer.residual_weight.shape == (8, 3, 3, 3)
    other = SALTConv2d(3, 8, 3, 5, 2, padding=1, residual=True)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 7, 7, device=DEVICE)
    assert torch.equal(layer(x), other(x))
    assert "kernel_size=(3, 3)" in repr(layer) and "residual=True" in repr(layer)


def test_conv_errors():
    with pytest.raises(ValueError, match="groups"):
        SALTConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 1)
    with pytest.raises(ValueError, match="padding_mode"):
        SALTConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 2, 1)
    with pytest.raises(TypeError, match="conv"):
        SALTConv2d.from_conv2d(nn.Linear(4, 4), 2, 1)
    with pytest.raises(ValueError, match="rank"):
        SALTConv2d.from_conv2d(nn.Conv2d(2, 4, 1), 3, 1)  # rank > min(4, 2*1*1)
    with pytest.raises(ValueError, match="padding"):
        SALTConv2d(3, 4, 3, 2, 1, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding"):
        SALTConv2d(3, 4, 3, 2, 1, padding="full")
    layer = SALTConv2d(3, 4, 3, 2, 1)
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.randn(1, 5, 8, 8))
    with pytest.raises(TypeError, match="x: expected dtype"):
        layer(torch.randn(1, 3, 8, 8, dtype=torch.float64))


# ----------------------------------------------------------------------------- regulariser

def _regulariser_f64(layer):
    p = {n: t.detach().double().requires_grad_(t.requires_grad)
         for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t is not None}
    sig = p["sigma"] if layer.sigma_mode == "direct" else torch.relu(p["alpha"] * p["sigma0"] + p["beta"])
    value = (sig - p["sigma0"]).pow(2).sum().sqrt() + (layer.scaling * p["X"] @ p["Y"]).pow(2).sum().sqrt()
    return value, p


def test_regulariser_value_and_gradients():
    model = nn.Sequential(
        nn.Sequential(perturb(SALTLinear.from_linear(_linear(12, 10), 4, 2, scaling=0.3)), nn.ReLU()),
        perturb(SALTLinear.from_linear(_linear(10, 8, seed=1), 5, 3, sigma_mode="scale_shift", residual=True)),
        perturb(SALTConv2d.from_conv2d(_conv(CONV_CONFIGS[1]), 4, 2, sigma_mode="scale_shift")),
        nn.Linear(3, 3),
    )
    reg = salt_regularizer(model)
    assert reg.dim() == 0 and reg.dtype == torch.float32
    reg.backward()
    total = 0.0
    for layer in (model[0][0], model[1], model[2]):
        value, p = _regulariser_f64(layer)
        total = total + value
        names = [n for n, t in layer.named_parameters() if t.requires_grad and n != "bias"]
        grads = torch.autograd.grad(value, [p[n] for n in names])
        for n, g in zip(names, grads):
            assert max_rel_err(getattr(layer, n).grad, g) <= TOLERANCES[torch.float32], n
        assert layer.bias is None or layer.bias.grad is None
    assert max_rel_err(reg, total.detach()) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("sigma_mode", MODES)
def test_regulariser_zero_at_init_with_finite_gradients(sigma_mode):
    layer = SALTLinear.from_linear(_linear(12, 10), 4, 2, sigma_mode=sigma_mode)
    reg = salt_regularizer(layer)
    assert reg.item() == 0.0
    reg.backward()
    for n, t in layer.named_parameters():
        if t.requires_grad and n != "bias":
            assert torch.isfinite(t.grad).all() and not t.grad.any(), n


def test_regulariser_errors():
    with pytest.raises(ValueError, match="no SALT layers"):
        salt_regularizer(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="model"):
        salt_regularizer(torch.zeros(3))


def test_public_api():
    for name in ("SALTConv2d", "salt_regularizer"):
        assert name in salt_kernels.__all__


def test_regulariser_scale_shift_drift_does_not_cancel():
    """alpha = 1 + 2^-20 in fp32: the drift (alpha - 1) sigma0 is tiny next to sigma0 and
    must not be lost to rounding (relu(alpha sigma0) - sigma0 keeps ~1 digit of it)."""
    layer = SALTLinear.from_linear(_linear(30, 20), 8, 0, sigma_mode="scale_shift")
    with torch.no_grad():
        layer.alpha.fill_(1 + 2 ** -20)
    expect = 2 ** -20 * layer.sigma0.double().norm()
    assert max_rel_err(salt_regularizer(layer), expect) <= TOLERANCES[torch.float32]
