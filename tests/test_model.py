"""Model-level SALT (apply_salt / trainable_parameters / merge_salt / save_salt / load_salt)
on small toy models."""

import copy
import json

import pytest
import torch
from torch import nn

import salt_kernels
import salt_kernels.nn.linear as layers_mod
from salt_kernels import (
    SALTLinear,
    apply_salt,
    load_salt,
    merge_salt,
    print_trainable_parameters,
    read_salt_config,
    save_salt,
    trainable_parameters,
)
from salt_testing import TOLERANCES, max_rel_err

LINEAR_NAMES = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2")] + ["head"]


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1)
        return self.out(a @ self.v(x))


class MLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn, self.mlp = Attn(d), MLP(d, h)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Toy(nn.Module):
    """A tiny transformer-shaped model with PEFT-style names (q/k/v/out, fc1/fc2, head)."""

    def __init__(self, d=24, h=40, n_out=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(2))
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 7, 24, generator=g).to(dtype)


def _salt_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, SALTLinear))


@torch.no_grad()
def _fake_training(model, seed=5):
    """Move every trainable tensor as training would (X@Y becomes non-zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.device, p.dtype) * (p.abs().mean() + 0.1))


# ------------------------------------------------------------------ target_modules


@pytest.mark.parametrize(
    "targets, expected",
    [
        (None, LINEAR_NAMES),
        ("all-linear", LINEAR_NAMES),
        (["q", "v"], [f"blocks.{i}.attn.{n}" for i in range(2) for n in ("q", "v")]),
        (["attn.out", "head"], ["blocks.0.attn.out", "blocks.1.attn.out", "head"]),
        (r"blocks\.1\.mlp\..*", ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]),
        (r".*\.(q|fc2)", ["blocks.0.attn.q", "blocks.0.mlp.fc2", "blocks.1.attn.q", "blocks.1.mlp.fc2"]),
    ],
)
def test_target_modules_select_by_peft_rules(targets, expected):
    model = apply_salt(Toy(), rank=4, lora_rank=2, target_modules=targets)
    assert _salt_names(model) == sorted(expected)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n in expected)
    assert sorted(model.salt_config["layers"]) == sorted(expected)


def test_target_modules_suffix_is_dotted_not_substring():
    # "out" must not match "attn.out"'s siblings by substring, and "ttn.q" matches nothing
    with pytest.raises(ValueError, match="target_modules"):
        apply_salt(Toy(), rank=4, lora_rank=2, target_modules=["ttn.q"])


def test_target_modules_matching_non_linear_is_explained():
    with pytest.raises(ValueError, match=r"not nn.Linear / Conv1D / nn.Conv2d: blocks.0.norm \(LayerNorm\)"):
        apply_salt(Toy(), rank=4, lora_rank=2, target_modules=["norm"])


# ------------------------------------------------------------------ rank / energy


def test_rank_int_is_capped_per_layer():
    model = apply_salt(Toy(), rank=30, lora_rank=2)
    for name, spec in model.salt_config["layers"].items():
        assert spec["rank"] == min(30, spec["in_features"], spec["out_features"])
    assert model.get_submodule("blocks.0.attn.q").rank == 24  # 24x24
    assert model.get_submodule("blocks.0.mlp.fc1").rank == 24  # 24 -> 40
    assert model.get_submodule("head").rank == 5


@pytest.mark.parametrize("frac, want_q, want_head", [(0.5, 12, 3), (1.0, 24, 5), (0.01, 1, 1), (0.25, 6, 2)])
def test_rank_fraction_of_min_dim(frac, want_q, want_head):
    model = apply_salt(Toy(), rank=frac, lora_rank=1)
    assert model.get_submodule("blocks.1.attn.q").rank == want_q
    assert model.get_submodule("head").rank == want_head


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_keeps_smallest_rank_retaining_fraction(energy):
    base = Toy()
    model = apply_salt(copy.deepcopy(base), energy=energy, lora_rank=3)
    for name in LINEAR_NAMES:
        s2 = torch.linalg.svdvals(base.get_submodule(name).weight.double()) ** 2
        kept = torch.cumsum(s2, 0) / s2.sum()
        r = model.get_submodule(name).rank
        assert kept[r - 1] >= energy - 1e-6, (name, r)
        if r > 1:
            assert kept[r - 2] < energy, (name, r)
        assert model.get_submodule(name).lora_rank == min(3, r)


def test_numpy_rank_is_saved_as_json(tmp_path):
    np = pytest.importorskip("numpy")
    model = apply_salt(Toy(), rank=np.int64(4), lora_rank=np.int64(2))
    save_salt(model, tmp_path / "a.safetensors")
    assert read_salt_config(tmp_path / "a.safetensors")["rank"] == 4


def test_lora_rank_capped_at_layer_rank():
    model = apply_salt(Toy(), rank=2, lora_rank=8)
    assert all(model.get_submodule(n).lora_rank == 2 for n in LINEAR_NAMES)


# ------------------------------------------------------------------ freezing and counts


def test_freeze_base_trains_only_salt_sigma_x_y():
    model = apply_salt(Toy(), rank=6, lora_rank=2, target_modules=["q", "v", "fc1"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted(f"{layer}.{p}" for layer in _salt_names(model) for p in ("sigma", "X", "Y"))
    assert trainable == expected


def test_train_bias_and_no_freeze():
    model = apply_salt(Toy(), rank=6, lora_rank=2, target_modules=["q"], train_bias=True)
    assert model.get_submodule("blocks.0.attn.q").bias.requires_grad
    assert not model.get_submodule("blocks.0.attn.k").bias.requires_grad
    model = apply_salt(Toy(), rank=6, lora_rank=2, target_modules=["q"], freeze_base=False)
    # everything trains except SALT's frozen basis (U, V are the layer's frozen weights)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"blocks.{i}.attn.q.{b}" for i in (0, 1) for b in ("U", "V")}


def test_trainable_parameter_counts(capsys):
    base = Toy()
    n_base = sum(p.numel() for p in base.parameters())
    model = apply_salt(copy.deepcopy(base), rank=6, lora_rank=2, target_modules=["q", "fc1", "head"])
    trainable, total = trainable_parameters(model)
    # q: 24x24 -> r=6; fc1: 24->40 -> r=6; head: 24->5 -> r=5, r'=2
    per = lambda r, rr: r + 2 * r * rr
    assert trainable == 2 * per(6, 2) + 2 * per(6, 2) + per(5, 2)
    replaced = 2 * (24 * 24) + 2 * (24 * 40) + 24 * 5  # dense weights that became SALT
    salt_weights = 2 * 6 * (24 + 24) + 2 * 6 * (24 + 40) + 5 * (24 + 5)  # U and V
    salt_params = trainable
    assert total == n_base - replaced + salt_weights + salt_params
    assert print_trainable_parameters(model) is None
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}\n")


# ------------------------------------------------------------------ outputs: full rank, merge


@pytest.mark.parametrize("svd", ["exact", "lowrank"])
def test_full_rank_reproduces_base(svd):
    base = Toy()
    x = _inputs()
    model = apply_salt(copy.deepcopy(base), rank=1.0, lora_rank=4, svd=svd)
    with torch.no_grad():
        assert max_rel_err(model(x), base(x).double()) <= 5 * TOLERANCES[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_reproduces_trained_model(dtype):
    model = apply_salt(Toy().to(dtype), rank=0.5, lora_rank=3)
    _fake_training(model)
    x = _inputs(dtype)
    # float64 ground truth: the same SALT model with every tensor in float64
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        y_ref = ref(x.double())
        y_salt = model(x)
    merged = merge_salt(model)
    assert not _salt_names(merged) and not hasattr(merged, "salt_config")
    assert isinstance(merged.get_submodule("blocks.0.attn.q"), nn.Linear)
    assert merged.get_submodule("blocks.0.attn.q").weight.dtype == dtype
    with torch.no_grad():
        y_merged = merged(x)
    tol = 5 * TOLERANCES[dtype]
    assert max_rel_err(y_merged, y_ref) <= tol
    assert max_rel_err(y_salt, y_ref) <= tol
    # merged weight = U (diag(s) + X Y) V^T computed in float32 and rounded once
    layer = ref.get_submodule("blocks.1.mlp.fc1")
    W64 = layer.U @ (torch.diag(layer.sigma) + layer.X @ layer.Y) @ layer.V.t()
    W = merged.get_submodule("blocks.1.mlp.fc1").weight
    assert max_rel_err(W, W64) <= TOLERANCES[dtype]


# ------------------------------------------------------------------ save / load


def _trained(tmp_path, base, **kw):
    model = apply_salt(copy.deepcopy(base), **kw)
    _fake_training(model)
    info = save_salt(model, tmp_path / "adapter.safetensors")
    return model, info


@pytest.mark.parametrize("fresh", ["plain", "converted"])
@pytest.mark.parametrize("svd", ["exact", "lowrank"])
def test_save_load_reproduces_outputs(tmp_path, fresh, svd):
    base = Toy()
    kw = dict(rank=0.5, lora_rank=3, target_modules=["q", "k", "v", "fc1", "fc2"], svd=svd)
    model, info = _trained(tmp_path, base, **kw)
    x = _inputs()
    with torch.no_grad():
        y = model(x)
    torch.manual_seed(1234)  # a different RNG state: lowrank SVD would differ if recomputed
    target = copy.deepcopy(base) if fresh == "plain" else apply_salt(copy.deepcopy(base), **kw)
    loaded = load_salt(target, info["path"])
    assert loaded is target
    assert _salt_names(loaded) == _salt_names(model)
    with torch.no_grad():
        assert max_rel_err(loaded(x), y.double()) <= TOLERANCES[torch.float32]
    # the loaded model trains exactly what was trained
    assert sorted(n for n, p in loaded.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in model.named_parameters() if p.requires_grad)
    # and the untrained model really differs (the check can fail)
    with torch.no_grad():
        assert max_rel_err(base(x), y.double()) > 1e-2


class Shared(nn.Module):
    """One nn.Linear registered under two names (a tied / reused layer)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.enc = nn.Linear(24, 24)
        self.dec = self.enc
        self.out = nn.Linear(24, 5)

    def forward(self, x):
        return self.out(self.dec(torch.tanh(self.enc(x))))


def test_shared_module_stays_shared(tmp_path):
    """A module reachable under two names is converted, loaded and merged once and stays
    the same object under both (not a SALT layer under one name and the old Linear under
    the other)."""
    base = Shared()
    x = torch.randn(7, 24)
    model = apply_salt(copy.deepcopy(base), rank=12, lora_rank=2, target_modules=["enc", "dec"])
    assert isinstance(model.enc, SALTLinear) and model.dec is model.enc
    assert isinstance(model.out, nn.Linear)
    _fake_training(model)
    with torch.no_grad():
        y = model(x)
    info = save_salt(model, tmp_path / "shared.safetensors")
    loaded = load_salt(copy.deepcopy(base), info["path"])
    assert isinstance(loaded.enc, SALTLinear) and loaded.dec is loaded.enc
    with torch.no_grad():
        assert max_rel_err(loaded(x), y.double()) <= TOLERANCES[torch.float32]
    merged = merge_salt(loaded)
    assert type(merged.enc) is nn.Linear and merged.dec is merged.enc
    with torch.no_grad():
        assert max_rel_err(merged(x), y.double()) <= 1e-4
    # matching the second name alone converts the shared module too
    only_dec = apply_salt(copy.deepcopy(base), rank=12, lora_rank=2, target_modules=["dec"])
    assert isinstance(only_dec.dec, SALTLinear) and only_dec.enc is only_dec.dec
    assert list(only_dec.salt_config["layers"]) == ["enc"]  # recorded under its first name


def test_sign_flipped_basis_is_realigned_on_load(tmp_path, monkeypatch):
    """A base whose SVD comes back with other signs must still load correctly."""
    base = Toy()
    kw = dict(rank=0.75, lora_rank=4)
    model, info = _trained(tmp_path, base, **kw)
    x = _inputs()
    with torch.no_grad():
        y = model(x)

    real_svd = layers_mod.truncated_svd

    def flipped_svd(weight, rank, *args, **kwargs):
        U, S, V = real_svd(weight, rank, *args, **kwargs)
        signs = torch.ones(rank)
        signs[::2] = -1  # flip every other singular pair: U S V^T is unchanged
        return U * signs, S, V * signs

    monkeypatch.setattr(layers_mod, "truncated_svd", flipped_svd)
    for fresh in ("plain", "converted"):
        target = copy.deepcopy(base) if fresh == "plain" else apply_salt(copy.deepcopy(base), **kw)
        # copying the trained tensors into a base with flipped signs gives the wrong model
        naive = apply_salt(copy.deepcopy(base), **kw)
        assert torch.allclose(naive.head.U[:, 0], -model.head.U[:, 0])
        state = {k: v for k, v in model.state_dict().items() if k.endswith((".sigma", ".X", ".Y"))}
        naive.load_state_dict(state, strict=False)
        with torch.no_grad():
            assert max_rel_err(naive(x), y.double()) > 1e-2
        loaded = load_salt(target, info["path"])
        with torch.no_grad():
            assert max_rel_err(loaded(x), y.double()) <= TOLERANCES[torch.float32]
        q = loaded.get_submodule("blocks.0.attn.q")
        assert torch.allclose(q.U, model.get_submodule("blocks.0.attn.q").U, atol=1e-5)


def test_load_refuses_a_different_base(tmp_path):
    model, info = _trained(tmp_path, Toy(seed=0), rank=0.5, lora_rank=2)
    with pytest.raises(ValueError, match="does not match"):
        load_salt(Toy(seed=1), info["path"])


def test_trained_head_and_layer_options_round_trip(tmp_path):
    base = Toy()
    model = apply_salt(copy.deepcopy(base), rank=5, lora_rank=2, target_modules=["fc1"], backend="reference")
    model.head.requires_grad_(True)  # a task head trained next to SALT (PEFT's modules_to_save)
    _fake_training(model)
    info = save_salt(model, tmp_path / "a.safetensors")
    cfg = read_salt_config(info["path"])
    assert cfg["layers"]["blocks.0.mlp.fc1"]["kwargs"] == {"backend": "reference"}
    assert cfg["rank"] == 5 and cfg["lora_rank"] == 2 and cfg["target_modules"] == ["fc1"]
    loaded = load_salt(copy.deepcopy(base), info["path"])
    assert loaded.get_submodule("blocks.1.mlp.fc1").backend == "reference"
    assert torch.equal(loaded.head.weight, model.head.weight) and loaded.head.weight.requires_grad
    x = _inputs()
    with torch.no_grad():
        assert max_rel_err(loaded(x), model(x).double()) <= TOLERANCES[torch.float32]


def test_bf16_model_round_trip(tmp_path):
    base = Toy().to(torch.bfloat16)
    model, info = _trained(tmp_path, base, rank=0.5, lora_rank=2)
    loaded = load_salt(copy.deepcopy(base), info["path"])
    x = _inputs(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # same tensors, same dtype: bit-identical
    assert loaded.get_submodule("head").sigma.dtype == torch.bfloat16


def test_file_holds_only_trained_tensors_and_is_small(tmp_path):
    base = Toy(d=64, h=256)
    model, info = _trained(tmp_path, base, rank=16, lora_rank=4)
    assert info["file_bytes"] == (tmp_path / "adapter.safetensors").stat().st_size
    from safetensors.torch import load_file

    names = load_file(info["path"]).keys()
    trained = [k for k in names if not k.startswith("__salt_basis_check__.")]
    assert sorted(trained) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert info["file_bytes"] < 0.2 * base_bytes, (info["file_bytes"], base_bytes)
    with_basis = save_salt(model, tmp_path / "b.safetensors", include_basis=True)
    basis_elems = sum(m.U.numel() + m.V.numel() for m in model.modules() if isinstance(m, SALTLinear))
    assert with_basis["num_elements"] == info["num_elements"] + basis_elems


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(lora_rank=2), ValueError, "exactly one"),
        (dict(rank=4, energy=0.9, lora_rank=2), ValueError, "exactly one"),
        (dict(rank=0, lora_rank=2), ValueError, "rank"),
        (dict(rank=1.5, lora_rank=2), ValueError, "rank"),
        (dict(rank=0.0, lora_rank=2), ValueError, "rank"),
        (dict(rank="4", lora_rank=2), TypeError, "rank"),
        (dict(rank=True, lora_rank=2), TypeError, "rank"),
        (dict(energy=0.0, lora_rank=2), ValueError, "energy"),
        (dict(energy=1.1, lora_rank=2), ValueError, "energy"),
        (dict(rank=4, lora_rank=-1), ValueError, "lora_rank"),
        (dict(rank=4, lora_rank=2.0), TypeError, "lora_rank"),
        (dict(rank=4, lora_rank=2, svd="full"), ValueError, "svd"),
        (dict(rank=4, lora_rank=2, scaling="1"), TypeError, "scaling"),
        (dict(rank=4, lora_rank=2, target_modules=[]), TypeError, "target_modules"),
        (dict(rank=4, lora_rank=2, target_modules=3), TypeError, "target_modules"),
        (dict(rank=4, lora_rank=2, target_modules="nothing"), ValueError, "target_modules"),
        (dict(rank=4, lora_rank=2, bad_option=object()), TypeError, "JSON"),
    ],
)
def test_apply_salt_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        apply_salt(Toy(), **kwargs)


def test_bad_model_and_file_arguments(tmp_path):
    for fn in (trainable_parameters, merge_salt, lambda m: save_salt(m, tmp_path / "x"),
               lambda m: apply_salt(m, rank=2, lora_rank=1)):
        with pytest.raises(TypeError, match="model"):
            fn("not a model")
    with pytest.raises(ValueError, match="no SALT layers"):
        save_salt(Toy(), tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a salt_kernels adapter"):
        load_salt(Toy(), tmp_path / "other.safetensors")


def test_load_rejects_mismatched_conversion(tmp_path):
    base = Toy()
    _, info = _trained(tmp_path, base, rank=6, lora_rank=2)
    with pytest.raises(ValueError, match="rank=8 but the adapter was saved with rank=6"):
        load_salt(apply_salt(copy.deepcopy(base), rank=8, lora_rank=2), info["path"])
    other = Toy()
    other.head = nn.Linear(24, 9)
    with pytest.raises(ValueError, match="head"):
        load_salt(other, info["path"])
    other.head = nn.Identity()
    with pytest.raises(TypeError, match="head"):
        load_salt(other, info["path"])


def test_config_is_json_in_metadata(tmp_path):
    _, info = _trained(tmp_path, Toy(), energy=0.9, lora_rank=2, target_modules=r".*\.q")
    from safetensors import safe_open

    with safe_open(info["path"], framework="pt") as f:
        cfg = json.loads(f.metadata()["salt_config"])
    assert cfg["energy"] == 0.9 and cfg["rank"] is None and cfg["svd"] == "exact"
    assert set(cfg["layers"]) == {"blocks.0.attn.q", "blocks.1.attn.q"}
    assert all({"rank", "lora_rank", "scaling", "svd", "type"} <= set(s) for s in cfg["layers"].values())


def test_progress_bar_over_layers(capsys):
    apply_salt(Toy(), rank=2, lora_rank=1, progress=True)
    assert "apply_salt" in capsys.readouterr().err


def test_public_exports():
    for name in ("apply_salt", "merge_salt", "save_salt", "load_salt", "trainable_parameters",
                 "print_trainable_parameters"):
        assert name in salt_kernels.__all__ and callable(getattr(salt_kernels, name))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_apply_save_load_merge(tmp_path):
    base = Toy().cuda()
    model, info = _trained(tmp_path, base, rank=0.5, lora_rank=3)
    assert model.head.U.is_cuda  # SVD ran on the layer's device
    x = _inputs().cuda()
    with torch.no_grad():
        y = model(x)
        loaded = load_salt(copy.deepcopy(base), info["path"])
        assert max_rel_err(loaded(x), y.double()) <= 5 * TOLERANCES[torch.float32]
        merged = merge_salt(copy.deepcopy(model))
        assert max_rel_err(merged(x), y.double()) <= 5 * TOLERANCES[torch.float32]


# ------------------------------------------------------------------ Conv2d targets


class ConvNet(nn.Module):
    """A small SAM-neck-like stack: 1x1 and 3x3 convolutions, then a linear head."""

    def __init__(self):
        super().__init__()
        self.neck1 = nn.Conv2d(12, 16, 1, bias=False)
        self.neck2 = nn.Conv2d(16, 16, 3, padding=1, dilation=1)
        self.down = nn.Conv2d(16, 8, 3, stride=2, padding=2, dilation=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.down(torch.relu(self.neck2(self.neck1(x))))
        return self.head(h.mean((-2, -1)))


def _conv_inputs(seed=2):
    return torch.randn(2, 12, 9, 11, generator=torch.Generator().manual_seed(seed))


def test_conv2d_targets_are_converted_only_when_named():
    torch.manual_seed(0)
    model = apply_salt(ConvNet(), rank=4, lora_rank=2)  # default: Linear layers only
    assert isinstance(model.neck2, nn.Conv2d) and isinstance(model.head, SALTLinear)
    model = apply_salt(ConvNet(), rank=4, lora_rank=2, target_modules=["neck1", "neck2", "down"])
    assert all(isinstance(getattr(model, n), salt_kernels.SALTConv2d) for n in ("neck1", "neck2", "down"))
    assert isinstance(model.head, nn.Linear)
    # rank capped at min(out, in*kh*kw): neck1 is 16 x 12
    model = apply_salt(ConvNet(), rank=1.0, lora_rank=2, target_modules=r"neck\d")
    assert model.neck1.rank == 12 and model.neck2.rank == 16


def test_conv2d_full_rank_merge_and_save_load(tmp_path):
    torch.manual_seed(0)
    base = ConvNet()
    x = _conv_inputs()
    kw = dict(rank=1.0, lora_rank=3, target_modules=["neck1", "neck2", "down", "head"])
    with torch.no_grad():
        full = apply_salt(copy.deepcopy(base), **kw)
        assert max_rel_err(full(x), base(x).double()) <= 1e-5
    kw["rank"] = 0.5
    model, info = _trained(tmp_path, base, **kw)
    with torch.no_grad():
        y = model(x)
        assert max_rel_err(base(x), y.double()) > 1e-2  # training moved the outputs
        loaded = load_salt(copy.deepcopy(base), info["path"])
        assert isinstance(loaded.down, salt_kernels.SALTConv2d)
        assert max_rel_err(loaded(x), y.double()) <= TOLERANCES[torch.float32]
        merged = merge_salt(copy.deepcopy(model))
        assert type(merged.down) is nn.Conv2d and type(merged.head) is nn.Linear
        assert max_rel_err(merged(x), y.double()) <= 1e-5


def test_conv2d_load_rejects_other_geometry(tmp_path):
    torch.manual_seed(0)
    base = ConvNet()
    _, info = _trained(tmp_path, base, rank=2, lora_rank=1, target_modules=["down"])
    other = ConvNet()
    other.down = nn.Conv2d(16, 8, 3, stride=1, padding=2, dilation=2)
    with pytest.raises(ValueError, match=r"load_salt: layer 'down'.*stride"):
        load_salt(other, info["path"])


def test_conv2d_variants_round_trip(tmp_path):
    torch.manual_seed(0)
    base = ConvNet()
    x = _conv_inputs()
    model, info = _trained(tmp_path, base, rank=3, lora_rank=2, target_modules=["neck2", "head"],
                           residual=True, sigma_mode="scale_shift")
    with torch.no_grad():
        loaded = load_salt(copy.deepcopy(base), info["path"])
        assert loaded.neck2.residual and loaded.neck2.sigma_mode == "scale_shift"
        assert max_rel_err(loaded(x), model(x).double()) <= TOLERANCES[torch.float32]
