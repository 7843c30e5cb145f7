"""SALT on a quantized base, layer level: ``SALTLinear`` with a residual stored by
bitsandbytes (``quantize="nf4"`` / ``"fp4"`` / ``"int8"``), and built from bitsandbytes'
``Linear4bit`` / ``Linear8bitLt`` layers.

Forward and every gradient against a float64 reference built from the dequantized
residual (``salt_testing.dense_layer_f64``) on every backend, ``auto`` included;
conversion (SVD of the float32 weight, quantization of the residual, the alternation of
``quantize_iters``), reproducibility bit for bit, state dicts, dtype casts,
``torch.compile`` and the errors for bad input.
"""

import importlib.util
import sys

import pytest
import torch
from torch import nn

import salt_kernels.nn.quantized as quantized_mod
from salt_kernels import SALTLinear, truncated_svd
from salt_kernels.nn.quantized import QuantFormat, QuantizedWeight, dequantize_linear, linear_format
from salt_kernels.ops.dispatch import unavailable_reason
from salt_testing import TOLERANCES, assert_layer_matches_ground_truth, max_rel_err, perturb

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="needs bitsandbytes>=0.47 (the 'quant' extra)")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")

BACKENDS = ["reference", "triton", "cpu", "cuda", "auto"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4", "int8"]


def _require(backend):
    if backend != "auto":
        reason = unavailable_reason(backend, "cpu")
        if reason is not None:
            pytest.skip(f"backend '{backend}' unavailable on cpu: {reason}")


def _linear(K, D, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, D, bias=bias).to(dtype)


def _decaying(D, K, seed=0, decay=0.9):
    """A weight with a decaying spectrum, as pretrained weights have."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    V, _ = torch.linalg.qr(torch.randn(K, K, generator=g))
    n = min(D, K)
    return (U[:, :n] * decay ** torch.arange(n, dtype=torch.float32)) @ V[:, :n].t()


def bnb_linear(linear: nn.Linear, quant_type: str, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """``linear`` as bitsandbytes quantizes it when a model is loaded in 4 / 8 bits."""
    import bitsandbytes as bnb

    K, D, bias = linear.in_features, linear.out_features, linear.bias is not None
    if quant_type == "int8":
        q = bnb.nn.Linear8bitLt(K, D, bias=bias, has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(K, D, bias=bias, compute_dtype=linear.weight.dtype, compress_statistics=double_quant,
                              quant_type=quant_type)
        q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type, module=q)
    if bias:
        q.bias = nn.Parameter(linear.bias.data.clone())
    return q.to("cpu")  # bitsandbytes quantizes here


# ----------------------------------------------------------------------------- forward / backward


@needs_bnb
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((2, 7), 33, 29, 5, 3, True), ((11,), 64, 40, 19, 0, False),
                                   ((), 12, 9, 4, 2, True), ((0, 3), 8, 6, 2, 1, True)], ids=str)
def test_quantized_residual_matches_float64(backend, quant_type, dtype, shape):
    """y = Q(W_res) x + U C V^T x + b and the gradients of x, sigma, X, Y, bias, from
    trained (perturbed) parameters; odd sizes (a packed half byte, a partial block),
    leading batch dims, an empty batch, no bias, lora_rank 0."""
    _require(backend)
    lead, K, D, r, rl, bias = shape
    layer = perturb(SALTLinear.from_linear(_linear(K, D, dtype, bias), r, rl, scaling=0.7, backend=backend,
                                           residual=True, quantize=quant_type))
    assert layer.residual_weight is None and layer.quantized_residual.format.quant_type == quant_type
    x = torch.randn(*lead, K, dtype=torch.float64).to(dtype)
    assert_layer_matches_ground_truth(layer, x, dtype)


@needs_bnb
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantized_base_matches_float64(backend, quant_type):
    """A layer converted from a bitsandbytes layer keeps its quantized weight and computes
    Q(W) x + U (C - Sigma0) V^T x + b; non-contiguous x."""
    _require(backend)
    layer = perturb(SALTLinear.from_linear(bnb_linear(_linear(40, 24), quant_type), 8, 3, backend=backend,
                                           residual=True))
    assert layer.quantized_base
    x = torch.randn(3, 40, 9).transpose(1, 2)
    assert not x.is_contiguous()
    assert_layer_matches_ground_truth(layer, x, torch.float32)


@needs_bnb
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantized_base_equals_the_bnb_layer_and_keeps_its_weight(quant_type):
    q = bnb_linear(_linear(64, 32), quant_type)
    W = dequantize_linear(q)
    layer = SALTLinear.from_linear(q, 8, 4, residual=True)
    assert linear_format(q) == layer.quantized_residual.format
    assert layer.base_error == 0.0 and layer.U.dtype == torch.float32  # the dtype of the model around it
    # bit for bit the bnb layer's quantized weight
    assert torch.equal(layer.quantized_residual.dequantize(), W)
    if quant_type != "int8":
        assert torch.equal(layer.quantized_residual.qweight, q.weight.data.view(torch.uint8))
    x = torch.randn(5, 64)
    expected = x.double() @ W.double().t() + q.bias.double()
    assert max_rel_err(layer(x), expected) <= TOLERANCES[torch.float32]
    # the SVD is of the dequantized weight
    U, S, V = truncated_svd(W, 8)
    assert torch.equal(layer.sigma0, S) and torch.equal(layer.U, U) and torch.equal(layer.V, V)
    if quant_type == "nf4":  # the 4-bit layer's own forward (train mode: dequantize + GEMM)
        assert max_rel_err(layer(x), q.train()(x).double()) <= TOLERANCES[torch.float32]


@needs_bnb
def test_quantized_base_after_the_cpu_repacking():
    """On CPUs with AVX512-BF16 a Linear4bit run in eval mode repacks its weight for its
    CPU kernel; the conversion reads it back (bitsandbytes' own inverse)."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights here")
    q = bnb_linear(_linear(64, 32), "nf4")
    W = dequantize_linear(q)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y_bnb = q.eval()(x)
    assert q.weight.quant_state.packing_format_for_cpu
    layer = SALTLinear.from_linear(q, 8, 4, residual=True)
    # the repacking rounds the block scales to bfloat16; the layer computes what bnb now does
    assert max_rel_err(layer.quantized_residual.dequantize(), W.double()) < 1e-2
    assert max_rel_err(layer(x), y_bnb.double()) < 1e-2


@needs_bnb
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_quantized_layer_under_autocast_and_in_float64(backend):
    _require(backend)
    layer = perturb(SALTLinear.from_linear(_linear(33, 29), 5, 3, backend=backend, residual=True, quantize="nf4"))
    x = torch.randn(4, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = layer(x).double()
    assert max_rel_err(y, ref) <= TOLERANCES[torch.bfloat16]
    layer64 = layer.double()
    assert layer64.quantized_residual.absmax.dtype == torch.uint8  # the stored format is not cast
    assert layer64.quantized_residual.nested_absmax.dtype == torch.float32
    assert_layer_matches_ground_truth(layer64, x.double(), torch.float64)


# ----------------------------------------------------------------------------- conversion


@needs_bnb
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_conversion_quantizes_the_residual_of_the_stored_factors(quant_type):
    lin = _linear(48, 40, dtype=torch.bfloat16)
    layer = SALTLinear.from_linear(lin, 6, 2, residual=True, quantize=quant_type)
    # U, V, sigma in the layer's dtype; the SVD is of the float32 weight
    assert layer.U.dtype == layer.V.dtype == layer.sigma.dtype == torch.bfloat16
    U, S, V = truncated_svd(lin.weight, 6)
    assert torch.equal(layer.U, U.to(torch.bfloat16)) and torch.equal(layer.sigma0, S.to(torch.bfloat16))
    # the residual is W - U diag(sigma0) V^T of the stored (rounded) factors, quantized from float32
    W = lin.weight.float()
    L = (layer.U.float() * layer.sigma0.float()) @ layer.V.float().t()
    expected = QuantizedWeight.from_float(W - L, layer.quantized_residual.format)
    for name, buf in expected.named_buffers():
        assert torch.equal(buf, getattr(layer.quantized_residual, name)), name
    # base_error is ||W - L - Q|| / ||W||, and the layer equals that base at init
    err = (W - L - layer.quantized_residual.dequantize()).norm() / W.norm()
    assert layer.base_error == pytest.approx(err.item(), rel=1e-5)
    assert max_rel_err(layer.merged_weight(), (L + layer.quantized_residual.dequantize()).double()) < 1e-6


@needs_bnb
def test_quantize_iters_alternate_svd_and_quantization():
    lin = nn.Linear(96, 64)
    with torch.no_grad():
        lin.weight.copy_(_decaying(64, 96) + 0.01 * torch.randn(64, 96))
    layers = {k: SALTLinear.from_linear(lin, 8, 2, residual=True, quantize="nf4", quantize_iters=k) for k in (1, 2, 4)}
    # round 2 takes its basis from the SVD of W - Q (Q: round 1's quantized residual)
    U, S, V = truncated_svd(lin.weight - layers[1].quantized_residual.dequantize(), 8)
    assert torch.equal(layers[2].sigma0, S) and torch.equal(layers[2].U, U)
    errors = [layers[k].base_error for k in (1, 2, 4)]
    assert errors[2] < errors[1] < errors[0], errors
    # and QLoRA's error, quantizing W itself, is larger than all of them
    qlora = (lin.weight - QuantizedWeight.from_float(lin.weight, QuantFormat("nf4", 64, True)).dequantize()).norm()
    assert errors[0] < (qlora / lin.weight.norm()).item()


@needs_bnb
def test_conversion_is_reproducible_bit_for_bit():
    lin = _linear(70, 50)
    a, b = (SALTLinear.from_linear(lin, 12, 4, residual=True, quantize="nf4", quantize_iters=3) for _ in range(2))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k not in ("X",)), "basis or residual differs"


@needs_bnb
@pytest.mark.parametrize("kwargs, fmt", [
    ({}, QuantFormat("nf4", 64, True)),
    ({"quantize_blocksize": 128, "quantize_double": False}, QuantFormat("nf4", 128, False)),
])
def test_format_options_and_state_dict_round_trip(kwargs, fmt):
    layer = perturb(SALTLinear.from_linear(_linear(33, 29), 5, 3, residual=True, quantize="nf4", **kwargs))
    assert layer.quantized_residual.format == fmt
    fresh = SALTLinear(33, 29, 5, 3, residual=True, quantize="nf4", **kwargs)
    assert torch.equal(fresh.quantized_residual.dequantize(), torch.zeros(29, 33))  # built from scratch: zero
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(6, 33)
    assert torch.equal(fresh(x), layer(x))
    half = fresh.half()
    assert {n: b.dtype for n, b in half.quantized_residual.named_buffers()} == \
        {n: b.dtype for n, b in layer.quantized_residual.named_buffers()}
    assert max_rel_err(half(x.half()), layer(x).double()) <= TOLERANCES[torch.float16]


@needs_bnb
def test_memory_holds_no_dense_residual():
    layer = SALTLinear.from_linear(_linear(256, 128), 16, 4, residual=True, quantize="nf4")
    dense = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()]
             if t.is_floating_point() and t.numel() >= 128 * 256]
    assert dense == []
    assert layer.quantized_residual.nbytes() < 128 * 256 * 0.6  # ~4.1 bits a value with double quantization


@needs_bnb
def test_to_quantized_linear_and_to_linear():
    layer = perturb(SALTLinear.from_linear(_linear(64, 32), 8, 3, residual=True, quantize="nf4"))
    x = torch.randn(5, 64)
    dense = layer.to_linear()
    assert max_rel_err(dense(x), layer(x).double()) <= 5 * TOLERANCES[torch.float32]
    q = layer.to_quantized_linear()
    import bitsandbytes as bnb

    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"
    W = layer.merged_weight()
    assert torch.equal(dequantize_linear(q), QuantizedWeight.from_float(W, layer.quantized_residual.format).dequantize())
    assert max_rel_err(q.train()(x), layer(x).double()) < 0.2  # re-quantized: a 4-bit error


@needs_bnb
def test_compile_fullgraph_forward_and_backward():
    """The residual product (bitsandbytes' dequantize, registered as a torch op, and an
    autograd.Function) traces without a graph break."""
    layer = perturb(SALTLinear.from_linear(_linear(33, 29), 5, 3, residual=True, quantize="nf4",
                                           backend="reference"))
    x = torch.randn(2, 6, 33, requires_grad=True)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, layer.sigma, layer.X, layer.Y, layer.bias])
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    yc = compiled(x)
    grads_c = torch.autograd.grad(yc.square().sum(), [x, layer.sigma, layer.X, layer.Y, layer.bias])
    torch._dynamo.reset()
    assert max_rel_err(yc, y.double()) <= TOLERANCES[torch.float32]
    for g, gc in zip(grads, grads_c):
        assert max_rel_err(gc, g.double()) <= TOLERANCES[torch.float32]


@needs_bnb
def test_backward_keeps_no_dense_copy():
    """Autograd saves nothing of the residual's size for backward (it dequantizes again)."""
    layer = SALTLinear.from_linear(_linear(256, 128), 8, 2, residual=True, quantize="nf4")
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(x).sum().backward()
    assert max(saved) < 128 * 256 / 4
    assert x.grad is not None and layer.sigma.grad is not None


# ----------------------------------------------------------------------------- bad input


@needs_bnb
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"quantize": "nf4"}, ValueError, "quantize='nf4' needs residual=True"),
    ({"residual": True, "quantize": "nf3"}, ValueError, "quantize: expected None or one of"),
    ({"residual": True, "quantize": "int8", "quantize_blocksize": 64}, ValueError, "quantize_blocksize: only applies"),
    ({"residual": True, "quantize": "nf4", "quantize_blocksize": 48}, ValueError, "quantize_blocksize: expected one of"),
    ({"residual": True, "quantize": "nf4", "quantize_double": 1}, TypeError, "quantize_double: expected a bool"),
    ({"residual": True, "quantize": "nf4", "quantize_iters": 0}, ValueError, "quantize_iters: expected an int >= 1"),
    ({"residual": True, "quantize_iters": 2}, ValueError, "quantize_iters: only applies"),
    ({"quantize_blocksize": 64}, ValueError, "quantize_blocksize: only applies"),
])
def test_bad_quantize_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SALTLinear.from_linear(_linear(8, 6), 2, 1, **kwargs)


def test_missing_bitsandbytes_names_the_package_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match=r"'bitsandbytes>=0\.47'.*the 'quant' extra: pip install .*-e '\.\[quant\]'"):
        SALTLinear.from_linear(_linear(8, 6), 2, 1, residual=True, quantize="nf4")
    # a model without quantization never needs it
    assert SALTLinear.from_linear(_linear(8, 6), 2, 1, residual=True).residual_weight is not None


def test_old_bitsandbytes_is_refused(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.42.0"))
    with pytest.raises(ImportError, match="bitsandbytes >= 0.47, found 0.42.0"):
        quantized_mod.import_bitsandbytes()


def test_unsupported_quantized_layer_type_is_named():
    class Int8Linear(nn.Linear):  # a weight stored as integers by some other library
        def __init__(self):
            super().__init__(8, 6)
            self.weight = nn.Parameter(torch.zeros(6, 8, dtype=torch.int8), requires_grad=False)

    with pytest.raises(TypeError, match=r"linear: a Int8Linear with a Parameter of torch.int8 weight is a quantized"):
        SALTLinear.from_linear(Int8Linear(), 2, 1, residual=True)
