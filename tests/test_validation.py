"""Every bad input raises a clear TypeError/ValueError naming the argument."""

import pytest
import torch

import salt_kernels
from salt_kernels import BackendUnavailableError, SALTLinear
from salt_testing import make_salt_inputs


def _good():
    t = make_salt_inputs((4,), 10, 8, 5, 2)
    return {k: v.detach() for k, v in t.items()}


def _call(**over):
    kw = _good()
    kw.update(over)
    return salt_kernels.salt_linear(**kw)


@pytest.mark.parametrize(
    "over, exc, words",
    [
        (dict(x=torch.randn(4, 11)), ValueError, ["x:", "(4, 11)", "10"]),
        (dict(x=torch.tensor(1.0)), ValueError, ["x:", "0-d"]),
        (dict(x=torch.ones(4, 10, dtype=torch.int64)), TypeError, ["x:", "torch.int64"]),
        (dict(x=[[1.0] * 10]), TypeError, ["x:", "list"]),
        (dict(U=torch.randn(8, 6)), ValueError, ["V:", "(10, 6)", "(10, 5)"]),
        (dict(U=torch.randn(8)), ValueError, ["U:", "2-D", "(8,)"]),
        (dict(U=torch.randn(8, 0)), ValueError, ["U:", "rank >= 1"]),
        (dict(V=torch.randn(10, 4)), ValueError, ["V:", "(10, 4)", "(10, 5)"]),
        (dict(sigma=torch.randn(4)), ValueError, ["sigma:", "(5,)", "(4,)"]),
        (dict(sigma=torch.randn(5, 1)), ValueError, ["sigma:", "1-D"]),
        (dict(X=torch.randn(4, 2)), ValueError, ["X:", "(4, 2)"]),
        (dict(X=torch.randn(5, 6), Y=torch.randn(6, 5)), ValueError, ["X:", "lora_rank <= rank"]),
        (dict(Y=torch.randn(2, 4)), ValueError, ["Y:", "(2, 5)", "(2, 4)"]),
        (dict(bias=torch.randn(9)), ValueError, ["bias:", "(8,)", "(9,)"]),
        (dict(bias=torch.randn(8, dtype=torch.float64)), TypeError, ["bias:", "float64"]),
        (dict(U=torch.randn(8, 5, dtype=torch.float16)), TypeError, ["U:", "float16"]),
        (dict(V=torch.ones(10, 5, dtype=torch.int32)), TypeError, ["V:", "int32"]),
        (dict(backend="fast"), ValueError, ["backend", "'fast'"]),
        (dict(scaling="1"), TypeError, ["scaling"]),
        (dict(scaling=float("nan")), ValueError, ["scaling", "finite"]),
    ],
)
def test_bad_input(over, exc, words):
    with pytest.raises(exc) as info:
        _call(**over)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        # meta tensors stand in for a second device on a CPU-only machine
        with pytest.raises(ValueError, match="U: expected a tensor on x's device"):
            _call(U=torch.randn(8, 5, device="meta"))
    else:
        with pytest.raises(ValueError, match="on x's device"):
            _call(U=torch.randn(8, 5, device="cuda"))


def test_unavailable_backend_says_why():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so the 'cuda' request may be valid")
    with pytest.raises(BackendUnavailableError, match="backend='cuda' is not available"):
        _call(backend="cuda")


@pytest.mark.parametrize(
    "args, exc, words",
    [
        ((10, 8, 0, 0), ValueError, ["rank", "1 <= rank <= min", "8"]),
        ((10, 8, 9, 0), ValueError, ["rank", "8", "9"]),
        ((10, 8, 4, 5), ValueError, ["lora_rank", "<= rank = 4"]),
        ((10, 8, 4, -1), ValueError, ["lora_rank"]),
        ((10, 8, 4.0, 1), TypeError, ["rank", "float"]),
        ((0, 8, 1, 0), ValueError, ["in_features"]),
    ],
)
def test_layer_bad_ranks(args, exc, words):
    with pytest.raises(exc) as info:
        SALTLinear(*args)
    for w in words:
        assert w in str(info.value)


def test_from_linear_bad_args():
    lin = torch.nn.Linear(6, 4)
    with pytest.raises(ValueError, match="svd"):
        SALTLinear.from_linear(lin, 2, 1, svd="qr")
    with pytest.raises(ValueError, match="rank"):
        SALTLinear.from_linear(lin, 5, 1)
    with pytest.raises(TypeError, match="linear"):
        SALTLinear.from_linear(torch.nn.Conv1d(2, 2, 1), 1, 0)


def test_layer_wrong_input_width():
    layer = SALTLinear(6, 4, 3, 1)
    with pytest.raises(ValueError, match=r"x: expected last dimension 6"):
        layer(torch.randn(2, 5))
