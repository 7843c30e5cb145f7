"""What a new user hits first: errors that name the real cause, and PEFT-like helper
behaviour (print returns None, merge is in place and returns the model)."""

import copy

import pytest
import torch
from torch import nn

from salt_kernels import (
    SALTConv2d,
    SALTLinear,
    apply_salt,
    merge_salt,
    print_trainable_parameters,
    trainable_parameters,
)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6))


@pytest.mark.parametrize("x_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_input_dtype_mismatch_names_x_and_the_layer_dtype(x_dtype):
    layer = SALTLinear.from_linear(nn.Linear(12, 16), rank=4, lora_rank=2)
    with pytest.raises(TypeError) as err:
        layer(torch.randn(3, 12, dtype=x_dtype))
    msg = str(err.value)
    assert msg.startswith("x:"), msg
    assert str(x_dtype) in msg and "torch.float32 (the layer's dtype)" in msg, msg


def test_input_dtype_mismatch_residual_mode_names_x():
    layer = SALTLinear.from_linear(nn.Linear(12, 16), rank=4, lora_rank=2, residual=True)
    with pytest.raises(TypeError, match=r"^x: expected dtype torch.float32 \(the layer's dtype\), got torch.float64"):
        layer(torch.randn(2, 5, 12, dtype=torch.float64))


def test_conv_input_dtype_mismatch_names_x():
    conv = SALTConv2d.from_conv2d(nn.Conv2d(3, 4, 3), rank=2, lora_rank=1)
    with pytest.raises(TypeError, match=r"^x: expected dtype torch.float32 \(the layer's dtype\), got torch.float64"):
        conv(torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_input_of_layer_dtype_still_runs():
    layer = SALTLinear.from_linear(nn.Linear(12, 16).double(), rank=4, lora_rank=2)
    assert layer(torch.randn(3, 12, dtype=torch.float64)).dtype == torch.float64


def test_second_apply_salt_says_already_converted():
    model = apply_salt(_model(), rank=4, lora_rank=2, target_modules=["0"])
    for kwargs in (dict(target_modules=["0"]), dict(target_modules=["2"]), {}):
        with pytest.raises(ValueError, match=r"^model: already converted \(1 SALT layers, e\.g\. '0'\)"):
            apply_salt(model, rank=4, lora_rank=2, **kwargs)
    # the failed call changed nothing
    assert isinstance(model[0], SALTLinear) and type(model[2]) is nn.Linear


def test_merge_salt_is_in_place_and_returns_the_model():
    model = apply_salt(_model(), rank=1.0, lora_rank=2)
    keep = copy.deepcopy(model)
    x = torch.randn(5, 12)
    with torch.no_grad():
        expected = keep(x)
    merged = merge_salt(model)
    assert merged is model
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert isinstance(keep[0], SALTLinear)  # a deepcopy keeps the SALT model
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_salt_without_salt_layers_says_so():
    with pytest.raises(ValueError, match="^model: has no SALT layers to merge"):
        merge_salt(_model())
    model = merge_salt(apply_salt(_model(), rank=4, lora_rank=2))
    with pytest.raises(ValueError, match="no SALT layers"):
        merge_salt(model)  # merging twice


def test_print_trainable_parameters_prints_once_and_returns_none(capsys):
    model = apply_salt(_model(), rank=4, lora_rank=2)
    assert print_trainable_parameters(model) is None
    trainable, total = trainable_parameters(model)
    out = capsys.readouterr().out
    assert out == (f"trainable params: {trainable:,} || all params: {total:,} || "
                   f"trainable%: {100 * trainable / total:.4f}\n")


def test_autocast_accepts_any_input_dtype_like_nn_linear():
    # nn.Linear under autocast takes a bf16 x into an fp32 layer; so must SALTLinear.
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20)
    layer = SALTLinear.from_linear(base, rank=8, lora_rank=2)
    x = torch.randn(3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16_in = layer(x.bfloat16())
        y_fp32_in = layer(x)
        y_linear = base(x.bfloat16())
    assert y_bf16_in.dtype == y_fp32_in.dtype == y_linear.dtype == torch.bfloat16
    assert torch.equal(y_bf16_in, y_fp32_in)
