"""Cross-backend conformance: every available backend against float64 ground truth over
random problems (hypothesis), autocast like nn.Linear, and module plumbing (deepcopy,
pickle, state_dict across dtypes and devices) for every layer variant.

Tolerances come from salt_testing.TOLERANCES, the one table. Random problems include
degenerate ones (a 1-element dsigma summed over a few rows) whose exact result can cancel
to nearly zero, so errors here are measured against the magnitude of the summed terms
(salt_testing.magnitude_reference), the standard floating-point error bound. Example counts are small
for CI (the Triton interpreter is slow); raise them with SALT_HYPOTHESIS_EXAMPLES=200.
Examples are derandomized so CI is reproducible; hypothesis prints any failing example.
"""

import copy
import io
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import salt_kernels
from salt_kernels import SALTConv2d, SALTLinear
from salt_kernels.ops.dispatch import unavailable_reason
from salt_testing import (TOLERANCES, assert_layer_matches_ground_truth, assert_matches_ground_truth,
                          dense_layer_f64, make_salt_inputs, max_rel_err, perturb)

BACKENDS = ["reference", "triton", "cpu", "cuda"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
_SCALE = int(os.environ.get("SALT_HYPOTHESIS_EXAMPLES", "0"))


def _settings(examples):
    return settings(max_examples=_SCALE or examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _require(backend, device):
    reason = unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(f"backend '{backend}' unavailable on {device}: {reason}")


def _examples(backend, device):
    # the Triton interpreter runs kernels element by element in Python: fewer examples
    return 15 if backend == "triton" and device == "cpu" else 25


# --------------------------------------------------------------- salt_linear, every backend

@st.composite
def salt_problems(draw):
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    K, D = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    r = draw(st.integers(1, min(K, D)))
    return dict(
        lead=lead, K=K, D=D, r=r, r_lora=draw(st.integers(0, r)),
        dtype=draw(st.sampled_from(DTYPES)),
        bias=draw(st.booleans()),
        scaling=draw(st.sampled_from([1.0, 0.5, -1.3, 2.0])),
        x_layout=draw(st.sampled_from(["contiguous", "transposed", "sliced", "broadcast"])),
        basis_transposed=draw(st.booleans()),
        grad_basis=draw(st.booleans()),
        fp32_params=draw(st.booleans()),
        upstream=draw(st.sampled_from(["random", "sum"])),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def _restride_x(x, layout):
    """The same values as x (*lead, K) in another memory layout (a non-leaf view when
    strided, so dx flows through the view)."""
    x = x.detach()
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True)
    if layout == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide.requires_grad_(True)[..., ::2]
    if layout == "broadcast" and x.dim() >= 2 and x.shape[0] > 0:
        return x[:1].clone().requires_grad_(True).expand(x.shape)  # stride 0 along dim 0
    return x.requires_grad_(True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_salt_linear_conforms(backend, device):
    _require(backend, device)

    @_settings(_examples(backend, device))
    @given(p=salt_problems())
    def check(p):
        dtype = p["dtype"]
        pdt = torch.float32 if p["fp32_params"] and dtype in (torch.float16, torch.bfloat16) else None
        t = make_salt_inputs(p["lead"], p["K"], p["D"], p["r"], p["r_lora"], dtype, bias=p["bias"],
                             device=device, seed=p["seed"], grad_basis=p["grad_basis"], param_dtype=pdt)
        t["x"] = _restride_x(t["x"], p["x_layout"])
        if p["basis_transposed"]:  # U, V as transposed views of (r, D), (r, K) storage
            for n in ("U", "V"):
                t[n] = t[n].detach().t().contiguous().t().requires_grad_(p["grad_basis"])

        def fn(**kw):
            return salt_kernels.salt_linear(**kw, backend=backend)

        assert_matches_ground_truth(fn, t, dtype, scaling=p["scaling"], seed=p["seed"],
                                    upstream=p["upstream"], scale="magnitude")

    check()


# ------------------------------------------------------- SALTLinear variants, every backend

@st.composite
def layer_problems(draw):
    K, D = draw(st.integers(1, 32), ), draw(st.integers(1, 32))
    r = draw(st.integers(1, min(K, D)))
    return dict(
        lead=tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))),
        K=K, D=D, r=r, r_lora=draw(st.integers(0, r)),
        dtype=draw(st.sampled_from(DTYPES)),
        bias=draw(st.booleans()),
        sigma_mode=draw(st.sampled_from(["direct", "scale_shift"])),
        residual=draw(st.booleans()),
        x_layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        seed=draw(st.integers(0, 2 ** 16)),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_salt_linear_layer_variants_conform(backend, device):
    _require(backend, device)

    @_settings(_examples(backend, device))
    @given(p=layer_problems())
    def check(p):
        torch.manual_seed(p["seed"])
        dtype = p["dtype"]
        lin = nn.Linear(p["K"], p["D"], bias=p["bias"]).to(device=device, dtype=dtype)
        layer = SALTLinear.from_linear(lin, p["r"], p["r_lora"], scaling=0.9, backend=backend,
                                       sigma_mode=p["sigma_mode"], residual=p["residual"])
        perturb(layer, p["seed"])
        x = torch.randn(*p["lead"], p["K"], dtype=torch.float64).to(device=device, dtype=dtype)
        assert_layer_matches_ground_truth(layer, _restride_x(x, p["x_layout"]), dtype, scale="magnitude")

    check()


# ----------------------------------------------------------------------- SALTConv2d

@st.composite
def conv_problems(draw):
    cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    r = draw(st.integers(1, min(cout, cin * kh * kw)))
    return dict(
        cin=cin, cout=cout, kernel=(kh, kw), r=r, r_lora=draw(st.integers(0, r)),
        stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        batch=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
        bias=draw(st.booleans()),
        sigma_mode=draw(st.sampled_from(["direct", "scale_shift"])),
        residual=draw(st.booleans()),
        channels_last=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 16)),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_salt_conv2d_conforms(device):
    @_settings(25)
    @given(p=conv_problems())
    def check(p):
        torch.manual_seed(p["seed"])
        conv = nn.Conv2d(p["cin"], p["cout"], p["kernel"], p["stride"], p["padding"], p["dilation"],
                         bias=p["bias"]).to(device=device, dtype=p["dtype"])
        layer = perturb(SALTConv2d.from_conv2d(conv, p["r"], p["r_lora"], scaling=1.1,
                                               sigma_mode=p["sigma_mode"], residual=p["residual"]), p["seed"])
        # input big enough for the dilated kernel
        h = (p["kernel"][0] - 1) * p["dilation"][0] + 1 + 4
        w = (p["kernel"][1] - 1) * p["dilation"][1] + 1 + 3
        x = torch.randn(p["batch"], p["cin"], h, w, dtype=torch.float64).to(device=device, dtype=p["dtype"])
        if p["channels_last"]:
            x = x.to(memory_format=torch.channels_last)
        assert_layer_matches_ground_truth(layer, x, p["dtype"], scale="magnitude")

    # cuDNN may run fp32 convolutions in TF32 (torch's default for it), about 1e-3 from
    # fp32: the fp32 tolerance checks the layer's math, so TF32 is off here.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        check()


# ----------------------------------------------------------------------- autocast

def _autocast_dtypes(device):
    return [torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]


AUTOCAST_CASES = [(d, a) for d in DEVICES for a in _autocast_dtypes(d)]


def _autocast_forward(layer, device, amp_dtype):
    def forward(x):
        with torch.autocast(device, dtype=amp_dtype):
            return layer(x)
    return forward


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma_mode", ["direct", "scale_shift"])
@pytest.mark.parametrize("residual", [False, True], ids=["lowrank", "residual"])
def test_autocast_linear_like_nn_linear(device, amp_dtype, backend, sigma_mode, residual):
    _require(backend, device)
    torch.manual_seed(0)
    lin = nn.Linear(48, 40).to(device)
    layer = perturb(SALTLinear.from_linear(lin, 12, 4, backend=backend, sigma_mode=sigma_mode,
                                           residual=residual))
    x = torch.randn(3, 7, 48, device=device)
    # the recommended pattern: forward under autocast, backward outside
    assert_layer_matches_ground_truth(layer, x, amp_dtype, out_dtype=amp_dtype,
                                      forward=_autocast_forward(layer, device, amp_dtype))
    with torch.autocast(device, dtype=amp_dtype):
        expected_dtype = lin(x).dtype
        # and the common one, backward inside the autocast block: output in the autocast
        # dtype, gradients in the fp32 parameters' dtype, bf16/fp16 accuracy
        assert_layer_matches_ground_truth(layer, x, amp_dtype, out_dtype=expected_dtype)
        # autocast leaves float64 alone, for nn.Linear and for SALT
        x64 = x.double()
        assert copy.deepcopy(lin).double()(x64).dtype == torch.float64
        assert copy.deepcopy(layer).double()(x64).dtype == torch.float64
    assert expected_dtype == amp_dtype


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST_CASES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["lowrank", "residual"])
def test_autocast_conv_like_nn_conv2d(device, amp_dtype, residual):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1).to(device)
    layer = perturb(SALTConv2d.from_conv2d(conv, 7, 3, residual=residual, sigma_mode="scale_shift"))
    x = torch.randn(2, 6, 9, 9, device=device)
    assert_layer_matches_ground_truth(layer, x, amp_dtype, out_dtype=amp_dtype,
                                      forward=_autocast_forward(layer, device, amp_dtype))
    with torch.autocast(device, dtype=amp_dtype):
        expected_dtype = conv(x).dtype
        assert_layer_matches_ground_truth(layer, x, amp_dtype, out_dtype=expected_dtype)
    assert expected_dtype == amp_dtype


# ----------------------------------------------------- deepcopy, pickle, state_dict moves

def _layers(device="cpu"):
    torch.manual_seed(3)
    lin, conv = nn.Linear(14, 9).to(device), nn.Conv2d(3, 5, 3, padding=1).to(device)
    out = []
    for mode in ("direct", "scale_shift"):
        for residual in (False, True):
            out.append(perturb(SALTLinear.from_linear(lin, 4, 2, sigma_mode=mode, residual=residual)))
            out.append(perturb(SALTConv2d.from_conv2d(conv, 4, 2, sigma_mode=mode, residual=residual)))
    return out


def _input(layer, device="cpu", dtype=torch.float32):
    shape = (2, 3, 6, 7) if isinstance(layer, SALTConv2d) else (2, 5, 14)
    return torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("layer", _layers(), ids=repr)
def test_deepcopy_and_pickle(layer):
    x = _input(layer)
    y = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(clone) is type(layer) and repr(clone) == repr(layer)
        assert torch.equal(clone(x), y)
        for (n, a), (_, b) in zip(layer.state_dict().items(), clone.state_dict().items()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n
        with torch.no_grad():  # independent storage: changing the clone leaves the original
            clone.Y.add_(1.0)
        assert torch.equal(layer(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)


@pytest.mark.parametrize("layer", _layers(), ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_state_dict_across_dtypes(layer, dtype):
    """An fp32 state_dict loads into a layer of another dtype (cast on load), and the
    result matches that dtype's ground truth on the fp32 values."""
    other = copy.deepcopy(layer).to(dtype)
    with torch.no_grad():
        for t in other.parameters():
            t.zero_()
    other.load_state_dict(layer.state_dict())
    assert all(t.dtype == dtype for t in other.state_dict().values())
    x = _input(layer, dtype=dtype)
    p = {n: t.double() for n, t in layer.state_dict().items()}
    expect = dense_layer_f64(layer, p, x.double())
    assert max_rel_err(other(x), expect) <= max(TOLERANCES[dtype], 2 * TOLERANCES[torch.float32])
    # and back to fp32: the fp16/bf16 rounding is all that was lost
    back = copy.deepcopy(layer)
    back.load_state_dict(other.state_dict())
    assert max_rel_err(back(_input(layer)), expect) <= max(TOLERANCES[dtype], TOLERANCES[torch.float32])


@pytest.mark.parametrize("layer", _layers(), ids=repr)
def test_device_moves(layer):
    """.to(meta) keeps shapes and runs shape inference; a state_dict moves between devices."""
    meta = copy.deepcopy(layer).to("meta")
    assert all(t.device.type == "meta" for t in meta.state_dict().values())
    y_meta = meta(_input(layer, device="meta"))
    assert y_meta.device.type == "meta" and y_meta.shape == layer(_input(layer)).shape
    empty = copy.deepcopy(meta).to_empty(device="cpu")
    empty.load_state_dict(layer.state_dict())
    x = _input(layer)
    assert torch.equal(empty(x), layer(x))
    if torch.cuda.is_available():
        gpu = copy.deepcopy(layer).cuda()
        assert all(t.is_cuda for t in gpu.state_dict().values())
        cpu_again = copy.deepcopy(layer)
        cpu_again.load_state_dict(gpu.state_dict())
        assert torch.equal(cpu_again(x), layer(x))
        assert max_rel_err(gpu(x.cuda()), layer(x).double()) <= TOLERANCES[torch.float32]
