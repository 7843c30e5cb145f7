"""Backend choice: fallback with one warning, truthful available_backends, compile."""

import warnings

import pytest
import torch

import salt_kernels
from salt_kernels import SALTLinear
from salt_kernels.ops import dispatch
from salt_testing import make_salt_inputs


@pytest.fixture
def missing_cpu_backend(monkeypatch):
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "cpu", "salt_kernels.backends.not_built")
    dispatch.clear_backend_cache()
    yield
    dispatch.clear_backend_cache()


def test_auto_falls_back_with_one_warning(missing_cpu_backend):
    M = dispatch.AUTO_POLICY["cpu"][0][0] + 1  # above the CPU policy's first row (reference there)
    t = make_salt_inputs((M,), 8, 6, 3, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = salt_kernels.salt_linear(**t)
        y2 = salt_kernels.salt_linear(**t)
    msgs = [str(w.message) for w in caught if "salt_kernels" in str(w.message)]
    assert len(msgs) == 1 and "'cpu'" in msgs[0] and "not_built" in msgs[0]
    assert torch.equal(y1, y2)
    assert "cpu" not in salt_kernels.available_backends("cpu")
    assert "reference" in salt_kernels.available_backends("cpu")


def test_explicit_missing_backend_raises(missing_cpu_backend):
    t = make_salt_inputs((3,), 8, 6, 3, 1)
    with pytest.raises(salt_kernels.BackendUnavailableError, match="backend='cpu' is not available.*not_built"):
        salt_kernels.salt_linear(**t, backend="cpu")


def test_available_backends_all_run():
    """Every backend listed as available really runs on that device."""
    t = make_salt_inputs((4,), 10, 7, 3, 2)
    for name in salt_kernels.available_backends("cpu"):
        y = salt_kernels.salt_linear(**t, backend=name)
        assert y.shape == (4, 7)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compile_fullgraph(backend):
    torch.manual_seed(0)
    layer = SALTLinear(16, 8, 4, 2, backend=backend)
    with torch.no_grad():
        layer.Y.normal_()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert layer.X.grad is not None and x.grad is not None


def test_autocast_cpu_bfloat16_like_linear():
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 24)
    layer = SALTLinear.from_linear(lin, 24, 4)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_lin = layer(x), lin(x)
    assert y.dtype == y_lin.dtype == torch.bfloat16
    rel = ((y.float() - lin(x)).abs().max() / lin(x).abs().max()).item()
    assert rel < 3e-2


def test_rank_above_a_backends_limit():
    """Triton kernels support rank <= 256: asked for explicitly, a larger rank is a clear
    error; under "auto" the next backend in the order takes it."""
    from salt_kernels.ops.dispatch import unavailable_reason

    if unavailable_reason("triton", "cpu") is not None:
        pytest.skip(f"triton unavailable here: {unavailable_reason('triton', 'cpu')}")
    t = make_salt_inputs((2,), 300, 290, 260, 2)
    with pytest.raises(ValueError, match=r"U: backend='triton' supports rank <= 256, got rank 260"):
        salt_kernels.salt_linear(**t, backend="triton")


def test_auto_skips_backends_whose_rank_limit_is_exceeded(monkeypatch):
    monkeypatch.setitem(dispatch.AUTO_POLICY, "cpu", ((None, ("triton", "reference")),))
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, device: None)
    monkeypatch.setattr(dispatch, "_max_rank", lambda name, *need: 256 if name == "triton" else None)
    dispatch.clear_backend_cache()
    try:
        assert dispatch.resolve_backend("auto", "cpu", rank=256) == "triton"
        assert dispatch.resolve_backend("auto", "cpu", rank=257) == "reference"
    finally:
        dispatch.clear_backend_cache()


# ----------------------------------------------------------------------- the auto policy

def test_auto_policy_table_is_well_formed():
    """Every device's rows have increasing M bounds, end with an any-M row, name known
    backends and end in 'reference' (the fallback that always runs)."""
    for device_type, rows in dispatch.AUTO_POLICY.items():
        bounds = [b for b, _ in rows]
        assert bounds[-1] is None and all(b is not None for b in bounds[:-1]), device_type
        assert bounds[:-1] == sorted(bounds[:-1]), device_type
        for _, order in rows:
            assert order[-1] == "reference" and set(order) <= set(dispatch._BACKEND_MODULES), order
    assert dispatch.auto_order("cpu")[0] == "cpu"
    assert dispatch.auto_order("cpu", M=16) == ("reference",)  # measured: decode sizes
    assert dispatch.resolve_backend("auto", "cpu", rank=8, M=16) == "reference"
    assert dispatch.auto_order("cuda")[:2] == ("triton", "cuda")


@pytest.fixture
def size_policy(monkeypatch):
    """A CPU policy that sends M <= 8 to 'reference' and larger M to 'cpu' (if built)."""
    monkeypatch.setitem(dispatch.AUTO_POLICY, "cpu", ((8, ("reference",)), (None, ("cpu", "reference"))))
    dispatch.clear_backend_cache()
    yield
    dispatch.clear_backend_cache()


def test_auto_follows_size_policy(size_policy, monkeypatch):
    big = dispatch.resolve_backend("auto", "cpu", rank=3, M=9)
    assert dispatch.resolve_backend("auto", "cpu", rank=3, M=8) == "reference"
    assert dispatch.resolve_backend("auto", "cpu", rank=3, M=1) == "reference"
    assert dispatch.resolve_backend("auto", "cpu", rank=3) == big  # M unknown: the last row
    calls = []
    for name in {"reference", big}:
        key = (name, dispatch.PLAIN)
        monkeypatch.setitem(dispatch._IMPLS, key,
                            lambda *a, _n=name, _f=dispatch._IMPLS[key]: calls.append(_n) or _f(*a))
    for lead in [(2, 4), (9,)]:  # M = 8 and M = 9 (leading dims flattened)
        salt_kernels.salt_linear(**make_salt_inputs(lead, 6, 5, 3, 1))
    assert calls == ["reference", big]


def test_size_policy_compiles_to_one_graph(size_policy):
    """Under torch.compile(fullgraph=True) with M marked dynamic a size-dependent policy
    uses its last row: no graph break, no recompile across token counts, results match
    eager."""
    torch.manual_seed(0)
    layer = SALTLinear(16, 8, 4, 2, backend="auto")
    counts = {"frames": 0}

    def count(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    compiled = torch.compile(layer, fullgraph=True, backend=count)
    for M in (3, 20, 7):
        x = torch.randn(M, 16)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), layer(x))
    assert counts["frames"] == 1
