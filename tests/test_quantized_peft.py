"""SALT as a PEFT method on a model loaded in 4 / 8 bits: ``get_peft_model(model,
SaltConfig(residual=True))`` over bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers
(QLoRA's setting), through training, ``save_pretrained`` / ``from_pretrained``, merging
and export; and on all-MiniLM-L6-v2 loaded with ``BitsAndBytesConfig(load_in_4bit=True)``."""

import copy
import importlib.util

import pytest
import torch
from torch import nn

import salt_kernels as sk
from salt_testing import TOLERANCES, max_rel_err
from test_quantized_model import (MINILM_ENCODER, TARGETS, Toy, _embed, _train, _x, dequantized, in_4bit,  # noqa: F401
                                  minilm_4bit, minilm_path, one_thread)

peft = pytest.importorskip("peft", reason="pip install 'peft>=0.15' (in the 'test' extra)")
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                       reason="needs bitsandbytes>=0.47 (the 'quant' extra)"),
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),
]
from salt_kernels.peft import SaltConfig  # noqa: E402

TOL = 5 * TOLERANCES[torch.float32]


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_peft_on_a_quantized_model(tmp_path, quant_type):
    import bitsandbytes as bnb

    q = in_4bit(Toy(), quant_type)
    reference = dequantized(q)
    x = _x()
    config = SaltConfig(rank=8, lora_rank=4, target_modules=TARGETS, residual=True)
    model = peft.get_peft_model(copy.deepcopy(q), config)
    kind = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    assert sum(isinstance(m, kind) for m in model.modules()) == 8  # the quantized layers stay, as under QLoRA
    with torch.no_grad():  # equal to the quantized model at init
        assert max_rel_err(model(x), reference(x).double()) <= TOL
    losses = _train(model)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k.rpartition(".")[2] for k in saved} == {"sigma", "X", "Y", "basis_row", "basis_value"}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(q), tmp_path / "adapter")
    # (from_pretrained sets eval mode, in which bitsandbytes computes 4-bit layers in bfloat16
    # on CPUs with AVX512-BF16; the trained model ran in train mode)
    loaded.train()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
    info = sk.export_lora(model, tmp_path / "lora")
    assert info["base_error"] is None  # the LoRA applies to the quantized model exactly
    with torch.no_grad():
        merged = model.merge_and_unload()
        assert sum(isinstance(m, kind) for m in merged.modules()) == 8  # merged: quantized again
        err = max_rel_err(merged.train()(x), expected.double())
    assert err < 0.1


def test_peft_merge_unmerge_keeps_the_adapter_model():
    q = in_4bit(Toy())
    model = peft.get_peft_model(copy.deepcopy(q), SaltConfig(rank=8, lora_rank=4, target_modules=TARGETS,
                                                             residual=True))
    _train(model)
    x = _x()
    with torch.no_grad():
        expected = model(x).double()
        model.merge_adapter()
        merged = model(x)
        model.unmerge_adapter()
        unmerged = model(x)
    assert max_rel_err(merged, expected) < 0.1  # the merged weights quantized again
    assert max_rel_err(unmerged, expected) < 0.1


def test_peft_on_the_4bit_minilm(minilm_4bit):
    st = copy.deepcopy(minilm_4bit)
    expected = _embed(dequantized(st))
    encoder = st[0].auto_model
    st[0].auto_model = peft.get_peft_model(encoder, SaltConfig(rank=32, lora_rank=4, target_modules=MINILM_ENCODER,
                                                               residual=True))
    cos = torch.nn.functional.cosine_similarity(_embed(st), expected, dim=-1)
    assert cos.min().item() >= 0.999, cos


def test_peft_unsupported_quantized_layer_is_named():
    class Int8Linear(nn.Linear):
        def __init__(self):
            super().__init__(64, 64)
            self.weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)

    model = Toy()
    model.blocks[0]["q"] = Int8Linear()
    with pytest.raises(TypeError, match=r"target_modules: 'blocks.0.q': a Int8Linear"):
        peft.get_peft_model(model, SaltConfig(rank=4, lora_rank=2, target_modules=TARGETS, residual=True))
