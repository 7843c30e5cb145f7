"""export_lora: SALT models (apply_salt, or PEFT with SaltConfig) written as standard PEFT
LoRA adapters for the original base model, loaded back with PeftModel.from_pretrained."""

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="pip install 'peft>=0.15' (in the 'test' extra)")

from peft import PeftModel, get_peft_model  # noqa: E402
from salt_kernels import apply_salt, export_lora  # noqa: E402
from salt_kernels.peft import SaltConfig  # noqa: E402
from salt_testing import max_rel_err  # noqa: E402
from test_peft import PAIRS, embed, encode, minilm, one_thread, perturb, seeded, toy  # noqa: E402,F401


def lora_outputs(base, directory, x):
    lora = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    assert lora.peft_config["default"].peft_type == "LORA"
    with torch.no_grad():
        return lora(x)


def read_config(directory):
    with open(directory / "adapter_config.json") as f:
        return json.load(f)


# --------------------------------------------------------------------------- toy


def test_peft_residual_model_exports_exactly(tmp_path):
    base = toy()
    model = perturb(get_peft_model(copy.deepcopy(base), SaltConfig(rank=4, lora_rank=2, target_modules=["a", "b"],
                                                                  residual=True)))
    x = torch.randn(5, 13)
    with torch.no_grad():
        y = model(x)
    info = export_lora(model, tmp_path)
    cfg = read_config(tmp_path)
    assert info["rank"] == cfg["r"] == cfg["lora_alpha"] == 4 and info["num_layers"] == 2
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["a", "b"]
    assert max_rel_err(lora_outputs(base, tmp_path, x), y.double()) <= 1e-5


def test_apply_salt_residual_model_with_mixed_ranks(tmp_path):
    from safetensors.torch import load_file

    base = toy()
    model = perturb(apply_salt(copy.deepcopy(base), rank=0.5, lora_rank=2, residual=True, progress=False))
    ranks = {n: m.rank for n, m in model.named_modules() if hasattr(m, "rank")}
    assert ranks == {"a": 6, "b": 4}  # half of min(in, out)
    x = torch.randn(2, 3, 13)
    with torch.no_grad():
        y = model(x)
    assert export_lora(model, tmp_path)["rank"] == 6
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    # one rank for every layer (zero-padded): any LoRA server reads a single r / lora_alpha
    assert shapes == {"base_model.model.a.lora_A.weight": (6, 13), "base_model.model.a.lora_B.weight": (11, 6),
                      "base_model.model.b.lora_A.weight": (6, 11), "base_model.model.b.lora_B.weight": (7, 6)}
    assert max_rel_err(lora_outputs(base, tmp_path, x), y.double()) <= 1e-5


def test_failed_export_keeps_the_previous_files(tmp_path, monkeypatch):
    """Each file is written atomically: an export that fails while writing the weights
    (here: interrupted) leaves the previous adapter whole and no temporary file."""
    import safetensors.torch

    model = perturb(apply_salt(toy(), rank=0.5, lora_rank=2, residual=True, progress=False))
    export_lora(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["adapter_config.json", "adapter_model.safetensors"]

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_lora(perturb(model), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_full_rank_truncated_model_exports_at_full_rank(tmp_path):
    base = toy()
    model = perturb(apply_salt(copy.deepcopy(base), rank=1.0, lora_rank=2, progress=False))
    x = torch.randn(5, 13)
    with torch.no_grad():
        y = model(x)
    assert export_lora(model, tmp_path)["rank"] == 11  # min(13, 11) of layer a
    assert max_rel_err(lora_outputs(base, tmp_path, x), y.double()) <= 1e-5


def test_truncated_low_rank_refuses_with_reason(tmp_path):
    model = apply_salt(toy(), rank=3, lora_rank=2, progress=False)
    with pytest.raises(ValueError, match=r"truncated SALT \(rank 3 < min\(in, out\) = 11.*residual=True"):
        export_lora(model, tmp_path)
    peft_model = get_peft_model(toy(), SaltConfig(rank=3, lora_rank=2, target_modules=["a"], residual=False))
    with pytest.raises(ValueError, match="no rank-3 LoRA"):
        export_lora(peft_model, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_choose_among_named_adapters(tmp_path):
    base = toy()
    model = get_peft_model(copy.deepcopy(base), SaltConfig(rank=4, lora_rank=2, target_modules=["a"], residual=True))
    model.add_adapter("other", SaltConfig(rank=5, lora_rank=2, target_modules=["a"], residual=True))
    model.set_adapter("other")
    perturb(model)
    x = torch.randn(3, 13)
    with torch.no_grad():
        y_other = model(x)
    assert export_lora(model, tmp_path / "o")["rank"] == 5  # the active adapter
    assert max_rel_err(lora_outputs(base, tmp_path / "o", x), y_other.double()) <= 1e-5
    assert export_lora(model, tmp_path / "d", adapter_name="default")["rank"] == 4
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        export_lora(model, tmp_path / "m")


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no SALT layers"):
        export_lora(toy(), tmp_path)
    with pytest.raises(TypeError, match="model"):
        export_lora("model", tmp_path)
    model = apply_salt(toy(), rank=1.0, lora_rank=1, train_bias=True, progress=False)
    with pytest.raises(ValueError, match="train_bias"):
        export_lora(model, tmp_path)


def test_export_needs_no_peft():
    """salt_kernels (and export_lora in it) import without peft: no module the package
    imports at load time imports peft (checked on the source; a subprocess import would
    cost seconds)."""
    import salt_kernels

    pkg = Path(salt_kernels.__file__).parent
    for path in [pkg / "__init__.py", pkg / "model" / "export.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{'.' * node.level}{node.module or ''}"]
            assert not any(n in ("peft", ".peft") or n.startswith(("peft.", ".peft.")) for n in names), (path, names)


# --------------------------------------------------------------------------- MiniLM


def check_minilm(base, directory, salt_model, batch):
    """The exported LoRA on the original MiniLM against the SALT model: hidden states and
    mean-pooled sentence embeddings. Returns (min cosine, max relative error)."""
    lora = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    with torch.no_grad():
        h_salt, h_lora = salt_model(**batch).last_hidden_state, lora(**batch).last_hidden_state
        e_salt, e_lora = embed(salt_model, batch), embed(lora, batch)
        h_base = base(**batch).last_hidden_state
    cos = nn.functional.cosine_similarity(e_lora, e_salt, dim=-1).min().item()
    err = max_rel_err(h_lora, h_salt.double())
    print(f"\nexported LoRA vs SALT on MiniLM: min cosine {cos:.8f}, max relative error {err:.2e}")
    assert max_rel_err(h_salt, h_base.double()) > 1e-3  # the adapter does change the model
    assert cos >= 0.9999
    assert err <= 1e-4
    return cos, err


@pytest.fixture(scope="module")
def batch(minilm):
    return encode(minilm[1], [s for pair in PAIRS for s in pair])


def test_minilm_peft_model_export(minilm, batch, tmp_path):
    base = minilm[0]
    model = perturb(get_peft_model(copy.deepcopy(base), SaltConfig(rank=32, lora_rank=4, residual=True,
                                                                  target_modules=["query", "value", "intermediate.dense"])),
                    scale=0.02).eval()
    info = export_lora(model, tmp_path)
    assert info["rank"] == 32 and info["num_layers"] == 18
    check_minilm(base, tmp_path, model, batch)


def test_minilm_apply_salt_exports(minilm, batch, tmp_path):
    base = minilm[0]
    residual = perturb(apply_salt(copy.deepcopy(base), energy=0.5, lora_rank=4, residual=True,
                                  target_modules=["query", "value"], progress=False), scale=0.02).eval()
    export_lora(residual, tmp_path / "residual")
    check_minilm(base, tmp_path / "residual", residual, batch)
    full = perturb(apply_salt(copy.deepcopy(base), rank=1.0, lora_rank=4, target_modules=["query"],
                              progress=False), scale=0.02).eval()
    assert export_lora(full, tmp_path / "full")["rank"] == 384
    check_minilm(base, tmp_path / "full", full, batch)
