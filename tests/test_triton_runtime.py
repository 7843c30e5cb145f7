"""The triton backend's runtime contract beyond numerics: device guard, dynamic shapes
under torch.compile, CUDA-graph capture safety, and a reduction order independent of
the autotune config and of the GPU (docs/design.md, "Verifying GPU code without a GPU").

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py); the
tests marked ``gpu`` need CUDA (and two devices for the device-guard one)."""

import pytest
import torch
import triton

import salt_kernels
from salt_kernels.ops.dispatch import unavailable_reason
from salt_testing import assert_matches_ground_truth, make_salt_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable on {DEVICE}: {REASON}")

if REASON is None:
    from salt_kernels.backends.triton import kernels as tk


def _op_inputs(M=6, K=40, D=30, r=8, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    U = torch.randn(D, r, generator=g).to(dtype).to(device) / D ** 0.5
    V = torch.randn(K, r, generator=g).to(dtype).to(device) / K ** 0.5
    C = torch.randn(r, r, generator=g).to(device)
    b = torch.randn(D, generator=g).to(dtype).to(device)
    return x, U, V, C, b


# ---------------------------------------------------------------------------------------
# Item: device guard
# ---------------------------------------------------------------------------------------


def _as_if_on_cuda(monkeypatch):
    """Calls on CPU tensors take the path of CUDA calls (device guard, capture check):
    the runners decide it once per layout, so the cached ones are dropped."""
    monkeypatch.setattr(tk, "_guarded", lambda device: True)
    tk.clear_plan_cache()


@pytest.fixture
def fresh_plans():
    """Runners made under a test's patches do not outlive it."""
    tk.clear_plan_cache()
    yield
    tk.clear_plan_cache()


def test_launches_run_under_the_inputs_device_guard(monkeypatch, fresh_plans):
    """Both ops make the inputs' device current around their launches (Triton launches
    on the current device's current stream), where the device needs it (CUDA; forced
    here on CPU tensors); CPU calls under the interpreter skip the guard."""
    entered = []
    real_guard = tk._device_guard

    def spy(device):
        entered.append(device)
        return real_guard(device)

    assert tk._guarded(torch.device("cuda", 1)) and not tk._guarded(torch.device("cpu"))
    monkeypatch.setattr(tk, "_device_guard", spy)
    x, U, V, C, b = _op_inputs()
    y, Z = tk.salt_forward(x, U, V, C, b)
    tk.salt_backward(torch.randn_like(y), Z, U, V, C, True, True, True)
    assert entered == []
    _as_if_on_cuda(monkeypatch)
    y, Z = tk.salt_forward(x, U, V, C, b)
    tk.salt_backward(torch.randn_like(y), Z, U, V, C, True, True, True)
    assert entered == [x.device, x.device]


def test_device_guard_selects_the_tensor_device():
    guard = tk._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(tk._device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_first_is_current():
    """x on cuda:1 while cuda:0 is current: the kernels run on cuda:1 and match."""
    torch.cuda.set_device(0)
    t = make_salt_inputs((33,), 300, 200, 24, 6, torch.float32, device="cuda:1")
    y = salt_kernels.salt_linear(**t, scaling=0.7, backend="triton")
    assert y.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    assert_matches_ground_truth(lambda **kw: salt_kernels.salt_linear(**kw, backend="triton"), t,
                                torch.float32, scaling=0.7)


# ---------------------------------------------------------------------------------------
# Item: dynamic shapes (one graph for every token count)
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch (no GPU needed)")
def test_fake_path_keeps_token_count_symbolic():
    """The ops' fake kernels never look at M's value: tracing with a symbolic M on (fake)
    CUDA tensors adds no guard on it. (A traced launch planner would call int(M).)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torch._dynamo.source import LocalSource

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env, static_shapes=False)

    def fake(t, name, dynamic_rows=False):
        dims = [DimDynamic.DYNAMIC if dynamic_rows and i == 0 else DimDynamic.STATIC for i in range(t.dim())]
        return mode.from_tensor(t, source=LocalSource(name),
                                symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

    real = _op_inputs(M=64, device="cpu")
    x, U, V, C, b = (fake(t, n, n == "x") for t, n in zip(real, "xUVCb"))
    with mode:
        x, U, V, C, b = (t.to("cuda") for t in (x, U, V, C, b))
        M = x.shape[0]
        assert isinstance(M, torch.SymInt)
        y, Z = tk.salt_forward(x, U, V, C, b)
        G = torch.empty_like(y)
        dx, dC, db = tk.salt_backward(G, Z, U, V, C, True, True, True)
    assert y.shape[0] is M or y.shape[0].node.expr == M.node.expr
    assert dx.shape[0].node.expr == M.node.expr
    assert not shape_env.guards, [str(g.expr) for g in shape_env.guards]
    assert not shape_env.replacements  # M was never turned into a constant


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_compile_one_graph_for_every_token_count(how):
    """torch.compile(fullgraph=True) of the triton op with a dynamic token count: ONE
    graph (forward and backward through AOTAutograd) serves six token counts, and every
    output and gradient matches eager bitwise-close."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    t = make_salt_inputs((5,), 37, 29, 9, 3, torch.float32, device=DEVICE)
    params = [t[n] for n in ("sigma", "X", "Y", "bias")]
    U, V = t["U"], t["V"]

    def f(x):
        return tk.salt_linear_2d(x, U, V, *params[:3], params[3], 0.7)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True if how == "dynamic=True" else None)
    for M in (4, 7, 12, 20, 33, 64):  # (none equal to a weight dimension: no duck-sizing guard)
        x = torch.randn(M, 37, device=DEVICE, requires_grad=True)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 0)
        G = torch.randn(M, 29, device=DEVICE)
        got = compiled(x)
        g_got = torch.autograd.grad(got, [x, *params], G)
        want = f(x)
        g_want = torch.autograd.grad(want, [x, *params], G)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for six token counts"


# ---------------------------------------------------------------------------------------
# Item: CUDA-graph capture never autotunes or compiles
# ---------------------------------------------------------------------------------------


def test_capture_refuses_untuned_launch(monkeypatch):
    """While capturing, a launch whose autotune key was never tuned raises a clear error
    (the autotuner's key computed as Triton computes it); once tuned, it passes."""
    tuner = triton.autotune(tk.SHRINK_CONFIGS, key=tk._KEY + ["NEED_ACC", "COLSUM"],
                            prune_configs_by={"early_config_prune": tk._pruner("shrink")})(tk._shrink_kernel)
    monkeypatch.setattr(tk, "AUTOTUNE", True)
    monkeypatch.setitem(tk._AUTOTUNED, "shrink", tuner)
    x, U, V, C, b = _op_inputs(M=20)
    _, _, launches = tk.forward_launches(x, U, V, C, b)
    shrink = launches[0]
    with pytest.raises(tk.NotWarmedUpError, match=r"M=20.*salt_kernels\.warmup"):
        tk._check_tuned(shrink)
    # what Autotuner.run stores after tuning this launch
    tuner.cache[tk._autotune_key(tuner, shrink.args, shrink.kwargs)] = tk.SHRINK_CONFIGS[0]
    tk._check_tuned(shrink)
    # another token-count bucket is another key
    _, _, other = tk.forward_launches(torch.randn(200, 40), U, V, C, b)
    with pytest.raises(tk.NotWarmedUpError):
        tk._check_tuned(other[0])


def test_autotune_key_matches_triton():
    """_autotune_key reproduces the key Triton's Autotuner caches under: run the real
    autotuner (interpreted) with a benchmark stub and compare."""
    tuner = triton.autotune(tk.SHRINK_CONFIGS, key=tk._KEY + ["NEED_ACC", "COLSUM"],
                            prune_configs_by={"early_config_prune": tk._pruner("shrink")})(tk._shrink_kernel)
    tuner._bench = lambda *a, config, **k: [float(config.num_stages)]  # no timing under the interpreter
    x, U, V, C, b = _op_inputs(M=20)
    _, _, launches = tk.forward_launches(x, U, V, C, b)
    shrink = launches[0]
    tuner[shrink.grid](*shrink.args, **shrink.kwargs, **tk.COMPILE_OPTIONS)  # as _run launches it
    assert list(tuner.cache) == [tk._autotune_key(tuner, shrink.args, shrink.kwargs)]


def test_every_launch_passes_the_compile_options(monkeypatch):
    """Autotuned or not, forward and backward, every launch passes COMPILE_OPTIONS (FP
    fusion on: Triton 3.10 turns its default off), so all supported Tritons compile alike."""
    seen = []

    class Recorder:  # stands in for a kernel or an autotuner: kernel[grid](*args, **kwargs)
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(kwargs)

    monkeypatch.setattr(tk, "AUTOTUNE", True)
    monkeypatch.setitem(tk._AUTOTUNED, "shrink", Recorder())
    monkeypatch.setitem(tk._AUTOTUNED, "expand", Recorder())
    x, U, V, C, b = _op_inputs()
    _, Z, fwd = tk.forward_launches(x, U, V, C, b)
    *_, bwd = tk.backward_launches(torch.randn(6, 30), Z, U, V, C, True, True, True)
    launches = [L._replace(fn=Recorder()) for L in fwd + bwd]
    assert {L.name for L in launches} >= {"shrink", "expand", "mix"}
    tk._run(launches, x.device)
    assert len(seen) == len(launches)
    assert all(kwargs["enable_fp_fusion"] is True for kwargs in seen)


def test_capture_forbids_compiling(monkeypatch, fresh_plans):
    """While capturing, every launch runs with Triton's jit_cache_hook (called just
    before a compile) set to raise NotWarmedUpError; outside capture it is untouched."""
    seen = []
    monkeypatch.setattr(tk, "_check_tuned", lambda launch: seen.append(triton.knobs.runtime.jit_cache_hook))
    _as_if_on_cuda(monkeypatch)
    monkeypatch.setattr(tk, "_capturing", lambda device: True)
    before = triton.knobs.runtime.jit_cache_hook
    x, U, V, C, b = _op_inputs()
    tk.salt_forward(x, U, V, C, b)
    assert seen and all(h is tk._refuse_compile for h in seen)
    assert triton.knobs.runtime.jit_cache_hook is before
    with pytest.raises(tk.NotWarmedUpError, match="compile .*salt_kernels.warmup"):
        tk._refuse_compile(key=None, repr="_shrink_kernel[...]", fn=None)
    monkeypatch.setattr(tk, "_capturing", lambda device: False)
    seen.clear()
    tk.salt_forward(x, U, V, C, b)
    assert not seen


def test_capture_query_is_per_device(monkeypatch):
    """CPU tensors never count as capturing; CUDA ones ask torch for the current stream."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tk._capturing(torch.device("cuda", 0))
    assert not tk._capturing(torch.device("cpu"))


# ---------------------------------------------------------------------------------------
# Item: determinism independent of config and GPU
# ---------------------------------------------------------------------------------------


def test_split_does_not_depend_on_the_device():
    """The split count is a function of the sizes (a fixed program target), not of the
    SM count: decode on K = 4096 splits 256 ways on every GPU and under the interpreter."""
    assert tk._plan(1, 4096, 32, 2) == (16, 256, 16)
    assert tk._plan(1, 1500, 32, 4) == (16, 94, 16)
    assert tk._plan(1 << 15, 4096, 64, 2)[1] == 1  # enough row blocks: unsplit


def _run_all(t, G):
    y = salt_kernels.salt_linear(**t, scaling=0.8, backend="triton")
    grads = torch.autograd.grad(y, [t[n] for n in ("x", "sigma", "X", "Y", "bias")], G)
    return [y, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [20, 100])
def test_bitwise_equal_across_autotune_configs(monkeypatch, dtype, r):
    """Every autotune candidate of every launch gives bitwise the same forward and
    gradients (autotuning chooses only among reduction-order-equivalent configs)."""
    t = make_salt_inputs((70,), 300, 150, r, 6, dtype, device=DEVICE)
    G = torch.randn(70, 150, device=DEVICE).to(dtype)
    monkeypatch.setattr(tk, "FORCE_SPLIT", 2)
    monkeypatch.setattr(tk, "_PLANS", {})  # (restored afterwards: plans hold their configs)
    base = _run_all(t, G)
    real = tk.usable_configs
    n_tried = 0
    for kernel in ("shrink", "expand"):
        for i in range(1, 4):
            def pick(name, BM, R_PAD, elem, *, aligned=True, kernel=kernel, i=i):
                cs = real(name, BM, R_PAD, elem, aligned=aligned)
                return [cs[i % len(cs)]] if name == kernel else cs

            monkeypatch.setattr(tk, "usable_configs", pick)
            tk.clear_plan_cache()  # plans hold their configs
            for a, b in zip(base, _run_all(t, G)):
                assert torch.equal(a, b), (kernel, i)
            n_tried += 1
    assert n_tried == 6


def test_shrink_candidates_share_the_reduction_order():
    """The shrink's candidates differ only in pipeline depth: one K tile (BN: the order
    of the K reduction) and one warp count (the layout, so the order, of db's in-tile
    column sums) per entry. (The interpreter ignores warps and, for these shapes, sums
    BN tiles exactly, so the bitwise test above cannot see a GPU-only order change.)"""
    for table in (tk._CONFIG_TABLE, tk._UNALIGNED_CONFIGS):  # (the latter: odd ranks)
        for (kernel, elem, r_max), configs in table.items():
            if kernel == "shrink":
                assert len({(c.kwargs["BN"], c.num_warps) for c in configs}) == 1, (elem, r_max)
                assert tk._SPLIT_ALIGN % configs[0].kwargs["BN"] == 0  # split ranges are whole K tiles


# ---------------------------------------------------------------------------------------
# Odd ranks: rank strides without the divisibility-16 hint take their own configs
# ---------------------------------------------------------------------------------------


def _planned(M, K, D, r, dtype):
    x, G = torch.empty(M, K, dtype=dtype), torch.empty(M, D, dtype=dtype)
    U, V, C = torch.empty(D, r, dtype=dtype), torch.empty(K, r, dtype=dtype), torch.empty(r, r)
    _, Z, fwd = tk.forward_launches(x, U, V, C, torch.empty(D, dtype=dtype))
    *_, bwd = tk.backward_launches(G, Z, U, V, C, True, True, True)
    return fwd, bwd


def _named(L, name):
    return dict(zip(L.fn.arg_names, L.args))[name]


@pytest.mark.parametrize("r", [33, 200])
def test_mix_kernel_tiles_do_not_depend_on_the_rank_alignment(r):
    """The mix kernel (fp32 inputs, and r > 64) runs one stage at 4 warps whatever the
    rank's alignment: pipelined (2-3 stages) it spilled 16 B on sm_80 or sm_90 with some
    Triton at 4 and 8 warps (aot.py --full); with one stage every rank compiles clean."""
    for rank, dtype in ((r, torch.float32), (tk.rank_tiles(r)[0], torch.float32), (r, torch.bfloat16)):
        fwd, bwd = _planned(64, 256, 256, rank, dtype)
        mixes = [L for L in fwd + bwd if L.name == "mix"]
        assert mixes or (dtype == torch.bfloat16 and r <= 64)
        for L in mixes:
            assert [(c.num_warps, c.num_stages) for c in L.configs] == [(4, 1)], (rank, dtype)
            assert (L.kwargs["BM"], L.kwargs["BR"]) == tk.mix_tiles(tk.rank_tiles(r)[0], torch.empty((), dtype=dtype).element_size())[:2]


@pytest.mark.parametrize("r,dtype,M", [(9, torch.float32, 64), (17, torch.float32, 4096), (65, torch.bfloat16, 4096),
                                       (129, torch.bfloat16, 32), (200, torch.bfloat16, 32), (9, torch.bfloat16, 64),
                                       (33, torch.float32, 64), (1, torch.float32, 32), (40, torch.bfloat16, 32)])
def test_odd_ranks_take_the_unaligned_configs(r, dtype, M):
    """At an odd rank the planner offers only the candidates aot.py compiled clean there:
    no 128-column bf16 expand tiles (255 registers or spills), at most 2 stages in the
    fp32 shrink, 16-row fp32 expand tiles; the launches carry R_ALIGNED = 0 for the autotune
    key, and r = R_PAD keeps its configs."""
    elem = torch.empty((), dtype=dtype).element_size()
    R_PAD = tk.rank_tiles(r)[0]
    for rank, aligned in ((r, False), (R_PAD, True)):
        fwd, bwd = _planned(M, 512, 512, rank, dtype)
        for L in fwd + bwd:
            if L.name not in ("shrink", "expand"):
                continue
            assert _named(L, "R_ALIGNED") == int(aligned)
            assert L.configs == tk.usable_configs(L.name, L.kwargs["BM"], R_PAD, elem, aligned=aligned)
            if not aligned and L.name == "expand" and elem == 2:
                assert all(c.kwargs["BN"] <= 64 for c in L.configs)
            if not aligned and L.name == "expand" and elem == 4:
                assert L.kwargs["BM"] == 16
            if not aligned and L.name == "shrink" and elem == 4:
                assert all(c.num_stages <= 2 for c in L.configs)


def test_autotune_key_separates_aligned_and_odd_ranks():
    """r = 64 and r = 33 share R_PAD and the size buckets, but not their candidates: the
    autotune key carries R_ALIGNED, so a choice tuned for one is never reused for the other."""
    tuner = triton.autotune(tk.EXPAND_CONFIGS, key=tk._KEY + ["PROLOGUE_MIX", "HAS_BIAS"],
                            prune_configs_by={"early_config_prune": tk._pruner("expand")})(tk._expand_kernel)
    keys = []
    for r in (64, 33):
        fwd, _ = _planned(4096, 512, 512, r, torch.float32)
        (expand,) = [L for L in fwd if L.name == "expand"]
        keys.append(tk._autotune_key(tuner, expand.args, expand.kwargs))
        named = dict(zip(tuner.arg_names, expand.args), **expand.kwargs)
        assert tuner.early_config_prune(tk.EXPAND_CONFIGS, named) == expand.configs
    assert keys[0] != keys[1]
    for c in tk._UNALIGNED_CONFIGS.values():
        assert all(x in tk.SHRINK_CONFIGS + tk.EXPAND_CONFIGS for x in c)


# ---------------------------------------------------------------------------------------
# The basis layout the kernels see
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "every_other_rank", "rank1_odd_stride"])
def test_kernels_see_a_unit_stride_basis(layout, monkeypatch, fresh_plans):
    """U and V reach the kernels with a unit rank stride whatever the caller passed (a
    transposed basis, e.g. V = Vh.t() from torch.linalg.svd, spilled in some configs);
    a contiguous basis is passed through without a copy, and results are unchanged."""
    x, U, V, C, b = _op_inputs()
    make = {"contiguous": lambda B: B,
            "transposed": lambda B: B.t().contiguous().t(),
            "every_other_rank": lambda B: torch.repeat_interleave(B, 2, dim=1)[:, ::2],
            "rank1_odd_stride": lambda B: B[:, :1].t().contiguous().t().expand(B.shape[0], 1)}[layout]
    U2, V2 = make(U), make(V)
    for B in (U2, V2):
        out = tk.basis_for_kernels(B)
        assert out.stride(1) == 1 and torch.equal(out, B)
        assert (out.data_ptr() == B.data_ptr()) == (B.stride(1) == 1)
    seen = []
    real = tk._launch

    def spy(kernel, grid, args, kwargs):  # the basis operand of each launch: its rank stride, and the one passed
        if kernel is tk._shrink_kernel:
            seen.append(("shrink", args[3].stride(1), args[5]))
        elif kernel is tk._expand_kernel:
            seen.append(("expand", args[4].stride(1), args[6]))
        real(kernel, grid, args, kwargs)

    monkeypatch.setattr(tk, "_launch", spy)
    y, Z = tk.salt_forward(x, U2, V2, C, b)
    G = torch.randn_like(y)
    grads = tk.salt_backward(G, Z, U2, V2, C, True, True, True)
    assert seen == [("shrink", 1, 1), ("expand", 1, 1)] * 2
    y_ref, Z_ref = tk.salt_forward(x, U2.contiguous(), V2.contiguous(), C, b)
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, tk.salt_backward(G, Z_ref, U2.contiguous(), V2.contiguous(), C, True, True, True)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------
# Launch plans at GPU sizes (meta tensors: planned, never run)
# ---------------------------------------------------------------------------------------


def _meta_plan(M, K, D, r, dtype=torch.bfloat16, needs=(True, True, True), bias=True):
    x, G = torch.empty(M, K, dtype=dtype, device="meta"), torch.empty(M, D, dtype=dtype, device="meta")
    U, V = torch.empty(D, r, dtype=dtype, device="meta"), torch.empty(K, r, dtype=dtype, device="meta")
    C = torch.empty(r, r, device="meta")
    b = torch.empty(D, dtype=dtype, device="meta") if bias else None
    _, Z, fwd = tk.forward_launches(x, U, V, C, b)
    *_, bwd = tk.backward_launches(G, Z, U, V, C, *needs)
    return fwd, bwd


def _programs(launch) -> int:
    grid = launch.default[0]
    return grid[0] * (grid[1] if len(grid) > 1 else 1) * (grid[2] if len(grid) > 2 else 1)


def _gpu_preset_shapes():
    from salt_kernels.tools.bench.presets import FULL_PRESETS, select_shapes

    return [s for s in select_shapes(FULL_PRESETS) if s.r <= tk.MAX_RANK]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_reductions_fill_the_gpu_at_every_gpu_preset(dtype):
    """Every sum of partials (db's row-block partials, dC's row-group partials, the split
    shrink's partials) at every salt-bench GPU preset shape has >= 264 programs (2 per SM
    of an H100), at every level, wherever it has at least 4 x 264 outputs (the split sums
    at decode, M * r <= 1024 values, are the exception, and are counted here). dC's own
    kernel has >= 264 programs from M = 512 up (one 64 x 64 tile of rows below that)."""
    small = []
    for s in _gpu_preset_shapes():
        fwd, bwd = _meta_plan(s.M, s.K, s.D, s.r, dtype)
        for L in fwd + bwd:
            if L.name == "sum":
                out_len = L.args[2]
                if out_len >= 4 * tk._REDUCE_PROGRAMS:
                    assert _programs(L) >= tk._REDUCE_PROGRAMS, (s, L.default[0], out_len)
                else:
                    assert out_len == s.M * s.r and s.M <= 16, (s, out_len)  # the split sum at decode
                    small.append((s.M, _programs(L)))
            if L.name == "dc" and s.M >= 512:
                assert _programs(L) >= tk._REDUCE_PROGRAMS, (s, L.default[0])
    assert small  # the decode presets were planned


def test_dc_workspace_is_at_most_an_eighth_of_G():
    """The dC partials stay <= G's size / 8 at every M and r <= 256 (and dC is written
    directly, no workspace, when one row group suffices): at r = 256, M = 64k, D = 4096 in
    bf16 one partial per 32-row block would have been as large as G (512 MiB)."""
    for elem in (2, 4):
        for r in (1, 16, 33, 64, 100, 128, 200, 256):
            for D in sorted({r, 768, 4096, 11008}):
                for M in (1, 15, 16, 17, 512, 4097, 8192, 65536, 1 << 20):
                    ws = tk.dc_workspace_bytes(M, D, r, elem)
                    assert ws <= M * D * elem / 8, (elem, r, D, M, ws)
    M, D, r = 65536, 4096, 256
    _, bwd = _meta_plan(M, 4096, D, r)
    (dc,) = [L for L in bwd if L.name == "dc"]
    workspace = dc.args[4]
    assert workspace.dtype == torch.float32 and workspace.dim() == 3 and workspace.shape[1:] == (r, r)
    assert workspace.numel() * 4 <= M * D * 2 / 8
    assert _programs(dc) >= tk._REDUCE_PROGRAMS
    sums = [L for L in bwd if L.name == "sum" and L.args[2] == r * r]
    assert sums and sums[-1].args[4].shape == (r, r)  # the last level writes dC


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("r", [16, 64, 128, 256])
def test_decode_shrink_has_a_program_per_sm_and_sums_splits_once(dtype, r):
    """M <= 16 at K = 4096: the shrink runs >= 132 programs (one per SM of an H100), and
    its split partials are summed once, by one sum chain into Z (dT), which the mix or
    expand then read: no consumer re-sums the partials per column block."""
    for M in (1, 4, 16):
        fwd, bwd = _meta_plan(M, 4096, 4096, r, dtype)
        for launches in (fwd, bwd):
            shrink = launches[0]
            assert shrink.name == "shrink" and _programs(shrink) >= 132, (M, shrink.default[0])
            parts = shrink.args[6]
            assert parts.shape[0] > 1
            sums = [L for L in launches if L.name == "sum" and L.args[2] == M * r]
            assert sums[0].args[0] is parts and sums[0].args[1] == parts.shape[0]  # every partial, in one chain
            summed = sums[-1].args[4]  # Z (forward) or dT (backward)
            assert summed.shape == (M, r) and summed is not parts
            mix = [L for L in launches if L.name == "mix"]
            for L in launches:
                if L.name in ("mix", "dc") or (L.name == "expand" and not mix):
                    assert L.args[0] is summed, L.name  # the summed rows, never the partials
                elif L.name == "expand":
                    assert L.args[0] is mix[0].args[4]  # the mixed rows (written after the sum)
        assert [L.name for L in fwd][-1] == "expand"


def test_launch_plans_are_cached_per_layout():
    """The plan is computed once per (sizes, strides, dtypes, device, needed gradients):
    a second call only allocates and binds; another layout gets its own plan."""
    tk.clear_plan_cache()
    _meta_plan(64, 256, 128, 32)
    n = len(tk._PLANS)
    _meta_plan(64, 256, 128, 32)
    assert len(tk._PLANS) == n == 2
    _meta_plan(65, 256, 128, 32)
    _meta_plan(64, 256, 128, 32, needs=(True, False, False))
    assert len(tk._PLANS) == 5
    x = torch.empty(256, 64, device="meta").t()  # transposed x: another layout
    U, V, C = torch.empty(128, 32, device="meta"), torch.empty(256, 32, device="meta"), torch.empty(32, 32, device="meta")
    tk.forward_launches(x, U, V, C, None)
    assert len(tk._PLANS) == 6


def test_layers_that_differ_only_in_K_get_their_own_backward_plan():
    """The backward sees G (M, D), so K reaches its plan through V alone: a layer with
    the same M, D, r but another K must not reuse the first one's plan (dx would have the
    first layer's width)."""
    tk.clear_plan_cache()
    for K in (2, 4, 1, 3):
        t = make_salt_inputs((), K, 1, 1, 0, torch.float32, bias=True, device=DEVICE, seed=K)
        assert_matches_ground_truth(lambda **kw: salt_kernels.salt_linear(**kw, backend="triton"), t,
                                    torch.float32, seed=K, upstream="sum", scale="magnitude")


def test_sum_levels_are_a_function_of_the_sizes():
    """Two levels (or more) over fixed chunks of 32 partials, columns per program from the
    length alone: the order of every sum depends on (P, L) only. A sum of fewer than
    4 x 264 values (no level could fill the GPU) takes up to 256 partials in one level."""
    assert tk.sum_levels(8, 4096) == [(8, 8, 1, 2)]
    assert tk.sum_levels(128, 4096) == [(32, 8, 4, 2), (4, 8, 1, 2)]
    assert tk.sum_levels(2048, 65536) == [(32, 128, 64, 4), (32, 128, 2, 4), (2, 128, 1, 4)]
    assert tk.sum_levels(256, 64) == [(256, 4, 1, 1)]  # decode, M = 1, r = 64: one launch
    assert tk.sum_levels(256, 1024) == [(256, 4, 1, 1)]  # M = 16
    assert tk.sum_levels(257, 1024) == [(32, 4, 9, 1), (9, 4, 1, 1)]  # more partials: two levels
    assert tk.sum_levels(256, 1056) == [(32, 4, 8, 1), (8, 4, 1, 1)]  # 264 column blocks: two levels
    for P, L in ((2, 1), (33, 5), (1000, 100_000), (300, 7)):
        levels = tk.sum_levels(P, L)
        one_level = L < 4 * tk._REDUCE_PROGRAMS and P <= tk._ONE_LEVEL_MAX_ROWS
        assert levels[-1][2] == 1
        assert len(levels) == 1 if one_level else all(rows <= tk._SUM_ROWS for rows, *_ in levels)
