"""A table-driven audit of bad input across the whole public API (``salt_kernels.__all__``):
wrong types, shapes, dtypes, devices (meta vs cpu), non-finite values, rank 0 and above
min(D, K), empty models. Every case raises a clear exception whose message names the
argument (and what was expected); none crashes or returns a silently wrong answer.

``test_audit_covers_every_public_function`` fails when a public name has no row.
"""

import copy
import math

import pytest
import torch
from torch import nn

import salt_kernels as sk
from salt_kernels import AdapterFileError, SALTConv2d, SALTLinear

NAN, INF = float("nan"), float("inf")


def _lin(i=12, o=8):
    torch.manual_seed(0)
    return nn.Linear(i, o)


def _conv():
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 3, padding=1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6))


def _salt_model():
    return sk.apply_salt(_model(), rank=4, lora_rank=2)


def _op(**over):
    g = torch.Generator().manual_seed(0)
    kw = dict(x=torch.randn(3, 12, generator=g), U=torch.randn(8, 5, generator=g),
              V=torch.randn(12, 5, generator=g), sigma=torch.rand(5, generator=g),
              X=torch.randn(5, 2, generator=g), Y=torch.randn(2, 5, generator=g),
              bias=torch.randn(8, generator=g))
    kw.update(over)
    return sk.salt_linear(**kw)


def _saved(tmp, model=None, **kw):
    path = tmp / "adapter.safetensors"
    sk.save_salt(model if model is not None else _salt_model(), path, **kw)
    return path


def _file(tmp, data: bytes, name="f.safetensors"):
    path = tmp / name
    path.write_bytes(data)
    return path


def _nan_file(tmp, name):
    """An adapter with valid checksums whose tensor ``name`` holds NaN."""
    from salt_kernels.model import adapter_file

    path = _saved(tmp)
    config, tensors = adapter_file.read_adapter(path)
    tensors[name].view(-1)[0] = NAN if "sigma" in name else INF
    adapter_file.write_adapter(path, tensors, {"format": adapter_file.FORMAT_NAME,
                                               "salt_config": __import__("json").dumps(config)})
    return path


def _nan_param(name):
    model = _salt_model()
    with torch.no_grad():
        model.get_parameter(name).view(-1)[0] = NAN
    return model


# (public name, case id, call(tmp_path), expected exception, words the message must contain)
CASES = [
    # --- salt_linear: types, shapes, dtypes, devices, ranks
    ("salt_linear", "x list", lambda t: _op(x=[[1.0] * 12]), TypeError, ["x:", "list"]),
    ("salt_linear", "x int", lambda t: _op(x=torch.ones(3, 12, dtype=torch.int64)), TypeError, ["x:", "int64"]),
    ("salt_linear", "x 0-d", lambda t: _op(x=torch.tensor(1.0)), ValueError, ["x:", "0-d"]),
    ("salt_linear", "x last dim", lambda t: _op(x=torch.randn(3, 11)), ValueError, ["x:", "12"]),
    ("salt_linear", "x meta", lambda t: _op(x=torch.randn(3, 12, device="meta")), ValueError, ["device"]),
    ("salt_linear", "x float64", lambda t: _op(x=torch.randn(3, 12, dtype=torch.float64)), TypeError, ["float64"]),
    ("salt_linear", "U None", lambda t: _op(U=None), TypeError, ["U:", "NoneType"]),
    ("salt_linear", "U 1-D", lambda t: _op(U=torch.randn(8)), ValueError, ["U:", "2-D"]),
    ("salt_linear", "U rank 0", lambda t: _op(U=torch.randn(8, 0), V=torch.randn(12, 0), sigma=torch.randn(0),
                                              X=torch.randn(0, 0), Y=torch.randn(0, 0)), ValueError, ["U:", "rank >= 1"]),
    ("salt_linear", "U meta", lambda t: _op(U=torch.randn(8, 5, device="meta")), ValueError, ["U:", "device"]),
    ("salt_linear", "U fp16", lambda t: _op(U=torch.randn(8, 5).half()), TypeError, ["U:", "float16"]),
    ("salt_linear", "V rank", lambda t: _op(V=torch.randn(12, 4)), ValueError, ["V:", "(12, 5)"]),
    ("salt_linear", "V int", lambda t: _op(V=torch.ones(12, 5, dtype=torch.int32)), TypeError, ["V:", "int32"]),
    ("salt_linear", "sigma shape", lambda t: _op(sigma=torch.rand(4)), ValueError, ["sigma:", "(5,)"]),
    ("salt_linear", "sigma meta", lambda t: _op(sigma=torch.rand(5, device="meta")), ValueError, ["sigma:", "device"]),
    ("salt_linear", "X rows", lambda t: _op(X=torch.randn(4, 2)), ValueError, ["X:", "rank"]),
    ("salt_linear", "lora_rank > rank", lambda t: _op(X=torch.randn(5, 6), Y=torch.randn(6, 5)), ValueError,
     ["X:", "lora_rank <= rank"]),
    ("salt_linear", "Y shape", lambda t: _op(Y=torch.randn(2, 4)), ValueError, ["Y:", "(2, 5)"]),
    ("salt_linear", "bias shape", lambda t: _op(bias=torch.randn(9)), ValueError, ["bias:", "(8,)"]),
    ("salt_linear", "bias dtype", lambda t: _op(bias=torch.randn(8).double()), TypeError, ["bias:", "float64"]),
    ("salt_linear", "scaling str", lambda t: _op(scaling="1"), TypeError, ["scaling"]),
    ("salt_linear", "scaling bool", lambda t: _op(scaling=True), TypeError, ["scaling"]),
    ("salt_linear", "scaling nan", lambda t: _op(scaling=NAN), ValueError, ["scaling", "finite"]),
    ("salt_linear", "scaling inf", lambda t: _op(scaling=INF), ValueError, ["scaling", "finite"]),
    ("salt_linear", "backend name", lambda t: _op(backend="fast"), ValueError, ["backend", "'fast'"]),
    ("salt_linear", "backend None", lambda t: _op(backend=None), ValueError, ["backend"]),
    # --- SALTLinear: constructor, forward, from_linear, to_linear
    ("SALTLinear", "in_features str", lambda t: SALTLinear("12", 8, 4, 2), ValueError, ["in_features"]),
    ("SALTLinear", "in_features 0", lambda t: SALTLinear(0, 8, 4, 2), ValueError, ["in_features"]),
    ("SALTLinear", "out_features -1", lambda t: SALTLinear(12, -1, 4, 2), ValueError, ["out_features"]),
    ("SALTLinear", "rank 0", lambda t: SALTLinear(12, 8, 0, 0), ValueError, ["rank", "min(in_features, out_features) = 8"]),
    ("SALTLinear", "rank > min", lambda t: SALTLinear(12, 8, 9, 2), ValueError, ["rank", "8", "9"]),
    ("SALTLinear", "rank float", lambda t: SALTLinear(12, 8, 4.0, 2), TypeError, ["rank", "float"]),
    ("SALTLinear", "lora_rank -1", lambda t: SALTLinear(12, 8, 4, -1), ValueError, ["lora_rank"]),
    ("SALTLinear", "lora_rank > rank", lambda t: SALTLinear(12, 8, 4, 5), ValueError, ["lora_rank", "rank = 4"]),
    ("SALTLinear", "sigma_mode", lambda t: SALTLinear(12, 8, 4, 2, sigma_mode="log"), ValueError, ["sigma_mode", "'log'"]),
    ("SALTLinear", "residual int", lambda t: SALTLinear(12, 8, 4, 2, residual=1), TypeError, ["residual", "bool"]),
    ("SALTLinear", "scaling str", lambda t: SALTLinear(12, 8, 4, 2, scaling="a"), TypeError, ["scaling"]),
    ("SALTLinear", "scaling nan", lambda t: SALTLinear(12, 8, 4, 2, scaling=NAN), ValueError, ["scaling", "finite"]),
    ("SALTLinear", "backend name", lambda t: SALTLinear(12, 8, 4, 2, backend="fast"), ValueError, ["backend", "'fast'"]),
    ("SALTLinear", "dtype int", lambda t: SALTLinear(12, 8, 4, 2, dtype=torch.int64), TypeError, ["dtype", "int64"]),
    ("SALTLinear", "forward x shape", lambda t: SALTLinear(12, 8, 4, 2)(torch.randn(3, 11)), ValueError, ["x:", "12"]),
    ("SALTLinear", "forward x list", lambda t: SALTLinear(12, 8, 4, 2)([1.0] * 12), TypeError, ["x:", "list"]),
    ("SALTLinear", "forward x meta", lambda t: SALTLinear(12, 8, 4, 2)(torch.randn(3, 12, device="meta")),
     ValueError, ["device"]),
    ("SALTLinear", "forward residual x 0-d", lambda t: SALTLinear(12, 8, 4, 2, residual=True)(torch.tensor(1.0)),
     ValueError, ["x:", "0-d"]),
    ("SALTLinear", "from_linear not Linear", lambda t: SALTLinear.from_linear(_conv(), 2, 1), TypeError,
     ["linear", "Conv2d"]),
    ("SALTLinear", "from_linear rank 0", lambda t: SALTLinear.from_linear(_lin(), 0, 0), ValueError, ["rank"]),
    ("SALTLinear", "from_linear rank > min", lambda t: SALTLinear.from_linear(_lin(), 9, 1), ValueError,
     ["rank", "= 8"]),
    ("SALTLinear", "from_linear svd", lambda t: SALTLinear.from_linear(_lin(), 4, 1, svd="qr"), ValueError, ["svd", "'qr'"]),
    ("SALTLinear", "from_linear nan weight", lambda t: SALTLinear.from_linear(_nan_linear(), 4, 1), ValueError,
     ["linear", "NaN"]),
    ("SALTLinear", "to_linear args", lambda t: SALTLinear(12, 8, 4, 2).to_linear(1), TypeError, ["to_linear"]),
    # --- SALTConv2d
    ("SALTConv2d", "in_channels 0", lambda t: SALTConv2d(0, 4, 3, 2, 1), ValueError, ["in_channels"]),
    ("SALTConv2d", "kernel_size 0", lambda t: SALTConv2d(3, 4, 0, 2, 1), ValueError, ["kernel_size"]),
    ("SALTConv2d", "padding str", lambda t: SALTConv2d(3, 4, 3, 2, 1, padding="full"), ValueError, ["padding", "'full'"]),
    ("SALTConv2d", "same + stride", lambda t: SALTConv2d(3, 4, 3, 2, 1, stride=2, padding="same"), ValueError,
     ["padding", "stride"]),
    ("SALTConv2d", "rank > min", lambda t: SALTConv2d(3, 4, 3, 5, 1), ValueError, ["rank", "= 4"]),
    ("SALTConv2d", "rank 0", lambda t: SALTConv2d(3, 4, 3, 0, 0), ValueError, ["rank"]),
    ("SALTConv2d", "dtype int", lambda t: SALTConv2d(3, 4, 3, 2, 1, dtype=torch.int32), TypeError, ["dtype", "int32"]),
    ("SALTConv2d", "x list", lambda t: SALTConv2d(3, 4, 3, 2, 1)([1.0]), TypeError, ["x:", "list"]),
    ("SALTConv2d", "x channels", lambda t: SALTConv2d(3, 4, 3, 2, 1)(torch.randn(1, 2, 5, 5)), ValueError, ["x:", "3"]),
    ("SALTConv2d", "x 2-D", lambda t: SALTConv2d(3, 4, 3, 2, 1)(torch.randn(3, 5)), ValueError, ["x:"]),
    ("SALTConv2d", "x dtype", lambda t: SALTConv2d(3, 4, 3, 2, 1)(torch.randn(1, 3, 5, 5).double()), TypeError,
     ["x:", "float64"]),
    ("SALTConv2d", "from_conv2d not conv", lambda t: SALTConv2d.from_conv2d(_lin(), 2, 1), TypeError, ["conv", "Linear"]),
    ("SALTConv2d", "from_conv2d groups", lambda t: SALTConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 1),
     ValueError, ["conv", "groups"]),
    ("SALTConv2d", "from_conv2d padding_mode",
     lambda t: SALTConv2d.from_conv2d(nn.Conv2d(3, 4, 3, padding_mode="reflect"), 2, 1), ValueError, ["padding_mode"]),
    ("SALTConv2d", "from_conv2d nan weight", lambda t: SALTConv2d.from_conv2d(_nan_conv(), 2, 1), ValueError,
     ["conv", "NaN"]),
    ("SALTConv2d", "from_conv2d svd", lambda t: SALTConv2d.from_conv2d(_conv(), 2, 1, svd="x"), ValueError, ["svd"]),
    # --- truncated_svd
    ("truncated_svd", "weight list", lambda t: sk.truncated_svd([[1.0]], 1), TypeError, ["weight", "list"]),
    ("truncated_svd", "weight 1-D", lambda t: sk.truncated_svd(torch.randn(5), 1), ValueError, ["weight", "2-D"]),
    ("truncated_svd", "weight int", lambda t: sk.truncated_svd(torch.ones(4, 3, dtype=torch.int64), 1), TypeError,
     ["weight", "int64"]),
    ("truncated_svd", "weight nan", lambda t: sk.truncated_svd(torch.full((4, 3), NAN), 1), ValueError, ["weight", "NaN"]),
    ("truncated_svd", "rank 0", lambda t: sk.truncated_svd(torch.randn(4, 3), 0), ValueError, ["rank", "3"]),
    ("truncated_svd", "rank > min", lambda t: sk.truncated_svd(torch.randn(4, 3), 4), ValueError, ["rank", "3"]),
    ("truncated_svd", "rank str", lambda t: sk.truncated_svd(torch.randn(4, 3), "2"), TypeError, ["rank"]),
    ("truncated_svd", "svd name", lambda t: sk.truncated_svd(torch.randn(4, 3), 2, svd="x"), ValueError, ["svd"]),
    # --- apply_salt
    ("apply_salt", "model not module", lambda t: sk.apply_salt("bert", rank=2, lora_rank=1), TypeError, ["model", "str"]),
    ("apply_salt", "empty model", lambda t: sk.apply_salt(nn.Sequential(), rank=2, lora_rank=1), ValueError,
     ["target_modules", "matched no"]),
    ("apply_salt", "model without Linear", lambda t: sk.apply_salt(nn.Sequential(nn.ReLU()), rank=2, lora_rank=1),
     ValueError, ["target_modules", "matched no"]),
    ("apply_salt", "no rank/energy", lambda t: sk.apply_salt(_model(), lora_rank=1), ValueError, ["rank / energy"]),
    ("apply_salt", "rank and energy", lambda t: sk.apply_salt(_model(), rank=2, energy=0.9, lora_rank=1), ValueError,
     ["rank / energy"]),
    ("apply_salt", "rank 0", lambda t: sk.apply_salt(_model(), rank=0, lora_rank=1), ValueError, ["rank", ">= 1"]),
    ("apply_salt", "rank fraction > 1", lambda t: sk.apply_salt(_model(), rank=1.5, lora_rank=1), ValueError, ["rank"]),
    ("apply_salt", "rank str", lambda t: sk.apply_salt(_model(), rank="2", lora_rank=1), TypeError, ["rank"]),
    ("apply_salt", "rank nan", lambda t: sk.apply_salt(_model(), rank=NAN, lora_rank=1), ValueError, ["rank"]),
    ("apply_salt", "energy 0", lambda t: sk.apply_salt(_model(), energy=0.0, lora_rank=1), ValueError, ["energy"]),
    ("apply_salt", "energy 2", lambda t: sk.apply_salt(_model(), energy=2.0, lora_rank=1), ValueError, ["energy"]),
    ("apply_salt", "lora_rank -1", lambda t: sk.apply_salt(_model(), rank=2, lora_rank=-1), ValueError, ["lora_rank"]),
    ("apply_salt", "lora_rank float", lambda t: sk.apply_salt(_model(), rank=2, lora_rank=1.5), TypeError, ["lora_rank"]),
    ("apply_salt", "scaling inf", lambda t: sk.apply_salt(_model(), rank=2, lora_rank=1, scaling=INF), TypeError,
     ["scaling"]),
    ("apply_salt", "svd name", lambda t: sk.apply_salt(_model(), rank=2, lora_rank=1, svd="x"), ValueError, ["svd"]),
    ("apply_salt", "target_modules empty", lambda t: sk.apply_salt(_model(), rank=2, lora_rank=1, target_modules=[]),
     TypeError, ["target_modules"]),
    ("apply_salt", "target_modules int", lambda t: sk.apply_salt(_model(), rank=2, lora_rank=1, target_modules=3),
     TypeError, ["target_modules"]),
    ("apply_salt", "target_modules no match", lambda t: sk.apply_salt(_model(), rank=2, lora_rank=1, target_modules=["q"]),
     ValueError, ["target_modules", "matched no"]),
    ("apply_salt", "layer kwarg unknown", lambda t: sk.apply_salt(_model(), rank=2, lora_rank=1, colour=1), TypeError,
     ["colour"]),
    ("apply_salt", "layer kwarg bad value", lambda t: sk.apply_salt(_model(), rank=2, lora_rank=1, sigma_mode="x"),
     ValueError, ["sigma_mode"]),
    ("apply_salt", "nan weight", lambda t: sk.apply_salt(_nan_linear_model(), rank=2, lora_rank=1), ValueError,
     ["NaN"]),
    # --- save_salt
    ("save_salt", "model not module", lambda t: sk.save_salt(None, t / "a.safetensors"), TypeError, ["model", "NoneType"]),
    ("save_salt", "no SALT layers", lambda t: sk.save_salt(_model(), t / "a.safetensors"), ValueError,
     ["model", "no SALT layers"]),
    ("save_salt", "empty model", lambda t: sk.save_salt(nn.Module(), t / "a.safetensors"), ValueError,
     ["model", "no SALT layers"]),
    ("save_salt", "path int", lambda t: sk.save_salt(_salt_model(), 3), TypeError, ["path", "int"]),
    ("save_salt", "path missing dir", lambda t: sk.save_salt(_salt_model(), t / "nope" / "a.safetensors"),
     FileNotFoundError, ["path", "nope"]),
    ("save_salt", "path is a dir", lambda t: sk.save_salt(_salt_model(), t), IsADirectoryError, ["path"]),
    ("save_salt", "include_basis str", lambda t: sk.save_salt(_salt_model(), t / "a.safetensors", include_basis="yes"),
     TypeError, ["include_basis"]),
    ("save_salt", "nan sigma", lambda t: sk.save_salt(_nan_param("0.sigma"), t / "a.safetensors"), ValueError,
     ["'0.sigma'", "NaN"]),
    ("save_salt", "nan X", lambda t: sk.save_salt(_nan_param("2.X"), t / "a.safetensors"), ValueError, ["'2.X'", "NaN"]),
    # --- load_salt
    ("load_salt", "model not module", lambda t: sk.load_salt({}, _saved(t)), TypeError, ["model", "dict"]),
    ("load_salt", "path int", lambda t: sk.load_salt(_model(), 7), TypeError, ["path", "int"]),
    ("load_salt", "path missing", lambda t: sk.load_salt(_model(), t / "missing.safetensors"), FileNotFoundError,
     ["missing.safetensors"]),
    ("load_salt", "path is a dir", lambda t: sk.load_salt(_model(), t), IsADirectoryError, ["path"]),
    ("load_salt", "empty file", lambda t: sk.load_salt(_model(), _file(t, b"")), AdapterFileError, ["f.safetensors", "empty"]),
    ("load_salt", "text file", lambda t: sk.load_salt(_model(), _file(t, b"hello" * 20)), AdapterFileError,
     ["f.safetensors", "safetensors"]),
    ("load_salt", "truncated", lambda t: sk.load_salt(_model(), _file(t, _saved(t).read_bytes()[:-7])),
     AdapterFileError, ["f.safetensors"]),
    ("load_salt", "nan sigma in file", lambda t: sk.load_salt(_model(), _nan_file(t, "0.sigma")), AdapterFileError,
     ["'0.sigma'", "NaN or inf"]),
    ("load_salt", "inf X in file", lambda t: sk.load_salt(_model(), _nan_file(t, "2.X")), AdapterFileError,
     ["'2.X'", "NaN or inf"]),
    ("load_salt", "inf Y in file", lambda t: sk.load_salt(_model(), _nan_file(t, "2.Y")), AdapterFileError,
     ["'2.Y'", "NaN or inf"]),
    ("load_salt", "empty model", lambda t: sk.load_salt(nn.Sequential(), _saved(t)), ValueError,
     ["layer '0'", "no module"]),
    ("load_salt", "other base sizes", lambda t: sk.load_salt(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6)),
                                                             _saved(t)), ValueError, ["layer '0'", "in_features"]),
    ("load_salt", "other base weights", lambda t: sk.load_salt(_other_model(), _saved(t)), ValueError,
     ["layer '0'", "base model"]),
    ("load_salt", "other rank", lambda t: sk.load_salt(sk.apply_salt(_model(), rank=3, lora_rank=2), _saved(t)),
     ValueError, ["rank=3", "rank=4"]),
    ("load_salt", "conv for linear", lambda t: sk.load_salt(nn.Sequential(nn.Conv2d(12, 8, 1), nn.ReLU(), nn.Linear(8, 6)),
                                                            _saved(t)), TypeError, ["layer '0'", "Conv2d"]),
    # --- read_salt_config
    ("read_salt_config", "path None", lambda t: sk.read_salt_config(None), TypeError, ["path", "NoneType"]),
    ("read_salt_config", "path missing", lambda t: sk.read_salt_config(t / "missing.safetensors"), FileNotFoundError,
     ["missing.safetensors"]),
    ("read_salt_config", "text file", lambda t: sk.read_salt_config(_file(t, b"{}" * 8)), AdapterFileError,
     ["f.safetensors"]),
    # --- merge_salt
    ("merge_salt", "model not module", lambda t: sk.merge_salt(3), TypeError, ["model", "int"]),
    ("merge_salt", "bare SALT layer", lambda t: sk.merge_salt(SALTLinear(12, 8, 4, 2)), TypeError,
     ["model", "to_linear"]),
    # --- counting
    ("trainable_parameters", "model not module", lambda t: sk.trainable_parameters([]), TypeError, ["model", "list"]),
    ("print_trainable_parameters", "model not module", lambda t: sk.print_trainable_parameters("m"), TypeError,
     ["model", "str"]),
    # --- salt_regularizer
    ("salt_regularizer", "model not module", lambda t: sk.salt_regularizer(torch.randn(3)), TypeError,
     ["model", "Tensor"]),
    ("salt_regularizer", "no SALT layers", lambda t: sk.salt_regularizer(_model()), ValueError, ["model", "no SALT"]),
    ("salt_regularizer", "empty model", lambda t: sk.salt_regularizer(nn.Module()), ValueError, ["model", "no SALT"]),
    # --- available_backends
    ("available_backends", "device name", lambda t: sk.available_backends("gpu0"), RuntimeError, ["gpu0"]),
    ("available_backends", "device type", lambda t: sk.available_backends(["cpu"]), TypeError, ["device"]),
    ("why_unavailable", "unknown backend", lambda t: sk.why_unavailable("gpu", "cpu"), ValueError,
     ["backend", "'gpu'", "reference"]),
    ("why_unavailable", "device name", lambda t: sk.why_unavailable("reference", "gpu0"), RuntimeError, ["gpu0"]),
    # --- many adapters on one base, LoRA export, warm-up
    ("adapters", "model str", lambda t: sk.adapters("x", ["a"]).__enter__(), TypeError, ["model:", "str"]),
    ("adapters", "names int", lambda t: sk.adapters(_salt_model(), 3).__enter__(), TypeError, ["names:", "int"]),
    ("adapters", "unknown name", lambda t: sk.adapters(_salt_model(), ["nope"]).__enter__(), ValueError,
     ["names:", "'nope'"]),
    ("set_adapter", "model int", lambda t: sk.set_adapter(3, "a"), TypeError, ["model:", "int"]),
    ("set_adapter", "unknown name", lambda t: sk.set_adapter(_salt_model(), "nope"), ValueError,
     ["adapter_name:", "'nope'"]),
    ("delete_adapter", "unknown name", lambda t: sk.delete_adapter(_salt_model(), "nope"), ValueError,
     ["adapter_name:", "'nope'"]),
    ("list_adapters", "model str", lambda t: sk.list_adapters("x"), TypeError, ["model:", "str"]),
    ("export_lora", "model str", lambda t: sk.export_lora("x", t / "e"), TypeError, ["model:", "str"]),
    ("export_lora", "no SALT layers", lambda t: sk.export_lora(_model(), t / "e"), ValueError,
     ["model:", "no SALT layers"]),
    ("export_lora", "truncated below full rank", lambda t: sk.export_lora(_salt_model(), t / "e"), ValueError,
     ["export_lora", "truncated"]),
    ("warmup", "model str", lambda t: sk.warmup("x", [4]), TypeError, ["model_or_layer:", "str"]),
    ("warmup", "no token counts", lambda t: sk.warmup(_salt_model(), []), ValueError, ["token_counts:"]),
    ("warmup", "negative token count", lambda t: sk.warmup(_salt_model(), [-1]), ValueError, ["token_counts:", "-1"]),
    ("warmup", "dtype int", lambda t: sk.warmup(_salt_model(), [4], dtype=torch.int64), TypeError, ["dtype:", "int64"]),
]


def _nan_linear():
    lin = _lin()
    with torch.no_grad():
        lin.weight[0, 0] = NAN
    return lin


def _nan_conv():
    conv = _conv()
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = INF
    return conv


def _nan_linear_model():
    model = _model()
    with torch.no_grad():
        model[0].weight[1, 1] = INF
    return model


def _other_model():
    torch.manual_seed(99)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6))


@pytest.mark.parametrize("name, case, call, exc, words", CASES, ids=[f"{n}: {c}" for n, c, *_ in CASES])
def test_bad_input(name, case, call, exc, words, tmp_path):
    with pytest.raises(exc) as info:
        call(tmp_path)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


# Things that are not errors and must still give the true answer.
def test_true_answers_at_the_edges(capsys):
    assert sk.trainable_parameters(nn.Module()) == (0, 0)
    assert sk.trainable_parameters(nn.Sequential(nn.ReLU())) == (0, 0)
    layer = SALTLinear(12, 8, 8, 8)  # rank = min(D, K) is allowed: the full-rank layer
    assert layer(torch.randn(2, 12)).shape == (2, 8)
    zero = SALTLinear(12, 8, 3, 0)  # lora_rank 0 trains sigma alone
    assert zero.X.shape == (3, 0) and zero(torch.randn(2, 12)).shape == (2, 8)
    meta = SALTLinear(12, 8, 4, 2, device="meta")  # meta: shapes only, no values to check
    assert meta(torch.randn(2, 12, device="meta")).shape == (2, 8)
    model = sk.apply_salt(_model(), rank=100, lora_rank=100)  # int ranks cap at min(in, out)
    assert [m.rank for m in model.modules() if isinstance(m, SALTLinear)] == [8, 6]
    assert [m.lora_rank for m in model.modules() if isinstance(m, SALTLinear)] == [8, 6]
    assert isinstance(sk.available_backends("cpu"), list) and "reference" in sk.available_backends("cpu")
    # every backend missing from available_backends says why; the available ones say nothing
    for device in ("cpu", "cuda"):
        available = sk.available_backends(device)
        for backend in ("reference", "cpu", "cuda", "triton"):
            reason = sk.why_unavailable(backend, device)
            assert (reason is None) == (backend in available), (backend, device, reason)
    if not torch.cuda.is_available():
        assert "no CUDA device" in sk.why_unavailable("cuda", "cuda")
    sk.print_trainable_parameters(nn.Module())  # an empty model: 0%, no division by zero
    assert "trainable params: 0 || all params: 0 || trainable%: 0.0000" in capsys.readouterr().out


def test_audit_covers_every_public_function():
    functions = {n for n in sk.__all__ if callable(getattr(sk, n))
                 and not (isinstance(getattr(sk, n), type) and issubclass(getattr(sk, n), BaseException))}
    covered = {n for n, *_ in CASES}
    assert functions - covered == set(), f"no audit row for {sorted(functions - covered)}"
    assert len(CASES) >= 100, len(CASES)
