"""GPT-2's ``Conv1D`` layers (a linear layer with its weight stored as (in, out)) end to end,
on a small GPT-2 built from its config (no download): through PEFT (SaltConfig: default
target modules, train, save, load, merge, export, mixed batches in forward and generate,
against PEFT's LoRA on the exported adapters) and through apply_salt (convert, train,
save_salt / load_salt, merge_salt back to Conv1D, export_lora)."""

import copy
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers", reason="pip install transformers")
peft = pytest.importorskip("peft", reason="pip install 'peft>=0.15' (in the 'test' extra)")

from peft import PeftModel, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from salt_kernels import apply_salt, export_lora, load_salt, merge_salt, save_salt  # noqa: E402
from salt_kernels.nn import SALTConv1D  # noqa: E402
from salt_kernels.peft import SaltConfig, SaltLinear  # noqa: E402
from salt_testing import TOLERANCES, max_rel_err  # noqa: E402


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture
def tokens():
    return torch.randint(1, 97, (4, 9), generator=torch.Generator().manual_seed(1))


def train(model, tokens, steps=3):
    """A few AdamW steps of the language-model loss; the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def logits(model, tokens, **kwargs):
    with torch.no_grad():
        return model(tokens, **kwargs).logits


# --------------------------------------------------------------------------- PEFT


def test_peft_conv1d_layer_matches_float64(gpt2):
    model = get_peft_model(copy.deepcopy(gpt2), SaltConfig(rank=6, lora_rank=3, init_weights=False))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SaltLinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = layer(x)
    core = layer.salt_core["default"]
    params = {n: p.detach().double().requires_grad_() for n, p in core.named_parameters()}
    W = layer.get_base_layer().weight.detach().double().t()  # (out, in)
    C = torch.diag(params["sigma"]) + core.scaling * params["X"] @ params["Y"]
    U, V, s0 = core.U.double(), core.V.double(), core.sigma0.double()
    x64 = x.detach().double().requires_grad_()
    ref = x64 @ (W + U @ (C - torch.diag(s0)) @ V.t()).t() + layer.get_base_layer().bias.double()
    tol = TOLERANCES[torch.float32]
    assert max_rel_err(y, ref) <= tol
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    for name, p in core.named_parameters():
        assert max_rel_err(p.grad, params[name].grad) <= tol, name
    assert max_rel_err(x.grad, x64.grad) <= tol


def test_peft_gpt2_end_to_end(gpt2, tokens, tmp_path):
    """Default target modules (PEFT's LoRA ones for gpt2: c_attn), train, save, load, merge, export."""
    model = get_peft_model(copy.deepcopy(gpt2), SaltConfig(rank=8, lora_rank=4))
    assert model.peft_config["default"].target_modules == {"c_attn"}
    assert sorted(model.base_model.targeted_module_names) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert torch.equal(logits(model, tokens), logits(gpt2, tokens))  # the identity at init
    model, losses = train(model, tokens)
    assert losses[-1] < losses[0]
    y = logits(model, tokens)
    model.save_pretrained(tmp_path / "salt")
    loaded = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "salt").eval()
    assert torch.equal(logits(loaded, tokens), y)
    merged = copy.deepcopy(loaded).merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
    assert max_rel_err(logits(merged, tokens), y.double()) <= 1e-5
    export_lora(loaded, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    lora = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "lora").eval()
    assert max_rel_err(logits(lora, tokens), y.double()) <= 1e-5


@pytest.fixture(scope="module")
def two_adapters(gpt2):
    """A SALT PeftModel with two trained-looking adapters of different ranks."""
    torch.manual_seed(2)
    model = get_peft_model(copy.deepcopy(gpt2), SaltConfig(rank=8, lora_rank=4, init_weights=False,
                                                            target_modules=["c_attn", "c_fc"]))
    model.add_adapter("small", SaltConfig(rank=4, lora_rank=2, init_weights=False, target_modules=["c_attn"]))
    return model.eval()


NAMES = ["default", "__base__", "small", "default"]


def test_mixed_batch_matches_rows_and_peft_lora_on_the_exported_adapters(gpt2, two_adapters, tokens, tmp_path):
    model = two_adapters
    y = logits(model, tokens, adapter_names=NAMES)
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with model.disable_adapter():
                row = logits(model, tokens[i:i + 1])
        else:
            model.set_adapter(name)
            row = logits(model, tokens[i:i + 1])
        assert max_rel_err(y[i:i + 1], row.double()) <= 1e-6, name
    model.set_adapter("default")
    for name in ("default", "small"):
        export_lora(model, tmp_path / name, adapter_name=name)
    lora = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "default").eval()
    lora.load_adapter(tmp_path / "small", adapter_name="small")
    assert max_rel_err(logits(lora, tokens, adapter_names=NAMES), y.double()) <= 1e-5


def test_generate_with_adapter_names(two_adapters, tokens):
    model = two_adapters
    prompt = tokens[:, :4]
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=prompt, adapter_names=NAMES, **greedy)
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=prompt[i:i + 1], **greedy)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=prompt[i:i + 1], **greedy)
            assert torch.equal(mixed[i], alone[0]), name
        model.set_adapter("default")
        # beam search repeats every sample per beam; the names follow
        beams = model.generate(input_ids=prompt, adapter_names=NAMES, num_beams=2, **greedy)
        model.set_adapter("small")
        alone = model.generate(input_ids=prompt[2:3], num_beams=2, **greedy)
    assert torch.equal(beams[2], alone[0])
    model.set_adapter("default")


def test_unsupported_layer_is_named(gpt2):
    with pytest.raises(TypeError, match=r"'transformer.wte' is a torch.nn.modules.sparse.Embedding"):
        get_peft_model(copy.deepcopy(gpt2), SaltConfig(target_modules=["wte"]))


# --------------------------------------------------------------------------- apply_salt


def test_apply_salt_gpt2_end_to_end(gpt2, tokens, tmp_path):
    model = apply_salt(copy.deepcopy(gpt2), rank=8, lora_rank=4, residual=True, progress=False,
                       target_modules=["c_attn", "c_fc", "c_proj"])
    convs = [m for m in model.modules() if isinstance(m, SALTConv1D)]
    assert len(convs) == 8 and (convs[0].in_features, convs[0].out_features) == (32, 96)
    assert max_rel_err(logits(model, tokens), logits(gpt2, tokens).double()) <= 1e-5  # residual: the base at init
    model, losses = train(model, tokens)
    assert losses[-1] < losses[0]
    y = logits(model, tokens)
    save_salt(model, tmp_path / "adapter.safetensors")
    loaded = load_salt(copy.deepcopy(gpt2), tmp_path / "adapter.safetensors").eval()
    assert torch.equal(logits(loaded, tokens), y)
    merged = merge_salt(copy.deepcopy(model))
    assert {type(merged.transformer.h[0].attn.c_attn), type(merged.transformer.h[1].mlp.c_proj)} == {Conv1D}
    assert max_rel_err(logits(merged, tokens), y.double()) <= 1e-5
    export_lora(model, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    lora = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "lora").eval()
    assert max_rel_err(logits(lora, tokens), y.double()) <= 1e-5


def test_apply_salt_all_linear_includes_conv1d(gpt2):
    model = apply_salt(copy.deepcopy(gpt2), rank=4, lora_rank=2, progress=False, target_modules="all-linear")
    assert sum(isinstance(m, SALTConv1D) for m in model.modules()) == 8  # c_attn, c_proj x 2, c_fc, c_proj
    with pytest.raises(TypeError, match="conv1d: expected a transformers Conv1D, got Linear"):
        SALTConv1D.from_conv1d(torch.nn.Linear(3, 4), 2, 1)
