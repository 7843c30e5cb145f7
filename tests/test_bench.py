"""salt-bench (the package's main job): it verifies before it times, refuses to time a
wrong backend (exit code 1), writes CSV and plots, and its baselines compute what they
claim. Runs the CLI on the seconds-long ``smoke`` preset; no timing is asserted."""

import csv
import sys
from pathlib import Path
import types

import pytest
import torch
import torch.nn.functional as F

from salt_kernels import bench, dispatch
from salt_kernels.backends import reference
from salt_kernels.bench_baselines import (official_rebuild_flops, official_salt_forward, official_salt_params,
                                         unfused_salt_chain)
from salt_testing import TOLERANCES, make_salt_inputs

# One thread: on a shared 2-core CI machine, two intra-op threads can wait on each other
# for milliseconds per op, which would make these seconds-long runs take a minute.
FAST = ["--presets", "smoke", "--min-time", "0.01", "--no-progress", "--threads", "1", "--backends", "reference"]


@pytest.fixture(autouse=True)
def _restore_threads_and_backends():
    # Tests swap backend implementations; dispatch caches resolved ones.
    n = torch.get_num_threads()
    dispatch.clear_backend_cache()
    yield
    torch.set_num_threads(n)
    dispatch.clear_backend_cache()


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_smoke_writes_csv_and_plots(tmp_path, capsys):
    assert bench.main(FAST + ["--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reference  ok" in out and "official SALT" in out and "dense nn.Linear" in out
    rows = _csv_rows(tmp_path / "results.csv")
    shapes = bench.PRESETS["smoke"]
    methods = {"reference", bench.DENSE, bench.OFFICIAL}
    assert len(rows) == len(shapes) * len(methods) * 2  # backend x shape x mode
    assert {r["backend"] for r in rows} == methods
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert float(r["time_ms"]) > 0
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["torch"] == torch.__version__
        if r["backend"] == "reference":
            assert float(r["speedup_vs_reference"]) == pytest.approx(1.0)
            assert float(r["verify_max_rel_err"]) <= TOLERANCES[torch.float32]
        if r["mode"] == "fwd+bwd":
            assert float(r["peak_mem_MiB"]) > 0
    for png in ("speedup_vs_reference.png", "speedup_vs_official.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_markdown_table(capsys):
    assert bench.main(FAST + ["--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| shape | method | fwd ms |" in out
    assert out.count("| tiny") == len(bench.PRESETS["smoke"]) * 3


def _wrong_gradient(fn):
    """Correct forward, dx off by 1%: only gradient verification can catch it."""
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    def wrapped(x, *args):
        return fn(Scale.apply(x), *args)
    return wrapped


def _raises(*args):
    raise RuntimeError("kernel launch failed")


@pytest.mark.parametrize("how", ["forward", "gradient", "raises"])
def test_wrong_reference_fails_verification(monkeypatch, capsys, how):
    good = reference.salt_linear_2d
    bad = {"forward": lambda *a: good(*a) * 1.001, "gradient": _wrong_gradient(good), "raises": _raises}[how]
    monkeypatch.setattr(reference, "salt_linear_2d", bad)
    assert bench.main(FAST) == 1
    out = capsys.readouterr().out
    assert "reference  FAILED" in out
    if how == "raises":
        assert "raised RuntimeError: kernel launch failed" in out
    assert "×ref" not in out  # nothing was timed


def test_new_backend_is_picked_up_and_a_wrong_one_never_timed(monkeypatch, tmp_path, capsys):
    """A backend registered in dispatch is verified automatically; a wrong one makes the
    run exit 1 and gets no timing rows, while the others are still timed."""
    mod = types.ModuleType("salt_bench_test_broken_backend")
    mod.availability = lambda device, backend: None
    mod.salt_linear_2d = lambda x, U, V, sigma, X, Y, bias, scaling: reference.salt_linear_2d(
        x, U, V, sigma * 1.01, X, Y, bias, scaling)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    # stands in for the compiled "cpu" backend (whether or not that one is built here)
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "cpu", mod.__name__)
    assert "cpu" in dispatch.available_backends("cpu")
    argv = FAST[:-1] + ["reference,cpu", "--output", str(tmp_path)]
    assert bench.main(argv) == 1
    out = capsys.readouterr().out
    assert "cpu        FAILED" in out and "reference  ok" in out
    backends = {r["backend"] for r in _csv_rows(tmp_path / "results.csv")}
    assert "cpu" not in backends and "reference" in backends


def test_verify_covers_every_available_backend():
    results = bench.verify_backends("cpu")
    assert set(results) == set(dispatch.available_backends("cpu"))
    assert all(bench.verification_passed(e) for r in results.values() for e in r.values())


def test_verify_tolerances_match_the_test_table():
    assert bench.VERIFY_TOLERANCES == TOLERANCES


def test_unknown_preset_and_backend_are_usage_errors(capsys):
    assert bench.main(["--presets", "nope"]) == 2
    assert bench.main(["--backends", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset" in err and "'nope' is not available" in err


@pytest.mark.parametrize("lora_rank", [0, 3])
def test_official_baseline_is_the_svd_of_the_weight(lora_rank):
    """At init (scale 1, shift 0) the official layer rebuilds the pretrained weight from
    its full SVD, plus its dense-space X Y term."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 24, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64)
    x = torch.randn(5, 24, generator=g, dtype=torch.float64)
    p = official_salt_params(W, rank=6, lora_rank=lora_rank, generator=g)
    assert p["U_full"].shape == (40, 24) and p["Vh_full"].shape == (24, 24)
    expect = F.linear(x, W + p["lora_X"] @ p["lora_Y"], b)
    torch.testing.assert_close(official_salt_forward(x, **p, bias=b), expect, rtol=1e-4, atol=1e-4)
    # a trainable shift below -sigma switches that singular value off (the ReLU)
    p["shift"][0] = -1e9
    U, S, Vh = torch.linalg.svd(W)
    W_cut = W - S[0] * torch.outer(U[:, 0], Vh[0])
    torch.testing.assert_close(official_salt_forward(x, **p, bias=b),
                               F.linear(x, W_cut + p["lora_X"] @ p["lora_Y"], b), rtol=1e-4, atol=1e-4)
    assert official_rebuild_flops(40, 24, lora_rank) == 2 * 40 * 24 * 48 + 2 * 40 * lora_rank * 24


def test_official_baseline_trains_the_right_tensors():
    shape = bench.PRESETS["smoke"][0]
    method = next(m for m in bench.build_methods("cpu", ["reference"]) if m.name == bench.OFFICIAL)
    inp = method.make_inputs(shape, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert [t.shape for t in inp.trainable] == [
        (shape.M, shape.K), (shape.r,), (shape.r,), (shape.D, shape.rl), (shape.rl, shape.K), (shape.D,)]
    assert not inp.args["U_full"].requires_grad and not inp.args["Vh_full"].requires_grad


def test_peak_memory_sees_a_temporary():
    n = 1 << 20  # 4 MiB of float32, alive only inside the step

    def step():
        torch.ones(n).sum()
    peak = bench.peak_memory_bytes(step, "cpu")
    assert 4 * n <= peak < 8 * n


def test_min_bytes_and_bandwidth_lookup():
    s = bench.Shape("t", "t", M=8, K=16, D=32, r=4, rl=2)
    assert bench.min_bytes(s, "fwd", 2) == 2 * (8 * 16 + 8 * 32 + (32 + 16) * 4)
    assert bench.min_bytes(s, "fwd+bwd", 2) == 2 * bench.min_bytes(s, "fwd", 2)
    assert bench.peak_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert bench.peak_bandwidth_gbps("NVIDIA H200") == 4800
    assert bench.peak_bandwidth_gbps("NVIDIA GH200 480GB") == 4000
    assert bench.peak_bandwidth_gbps("Some CPU") is None


def test_presets_respect_rank_limits():
    for shapes in bench.PRESETS.values():
        for s in shapes:
            assert 0 <= s.rl <= s.r <= min(s.D, s.K)


def test_time_helpers_on_cpu():
    calls = []
    assert bench.time_step(lambda: calls.append(1), "cpu", 0.01) > 0
    times = bench.time_steps({"a": lambda: None, "b": lambda: sum(range(100))}, "cpu", 0.01)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    assert len(calls) > 1
    samples = bench.sample_steps({"a": lambda: None}, 0.01, min_rounds=4)
    assert len(samples["a"]) >= 4 and all(t >= 0 for t in samples["a"])


def test_unfused_chain_matches_reference():
    """The issue's literal baseline computes the same layer as the reference backend."""
    t = make_salt_inputs((37,), 24, 20, 6, 3, torch.float64, seed=2)
    args = [t[k] for k in ("x", "U", "V", "sigma", "X", "Y", "bias")]
    torch.testing.assert_close(unfused_salt_chain(*args), reference.salt_linear_2d(*args, 1.0))


def test_bench_cpu_backend_script(monkeypatch, capsys):
    """benchmarks/bench_cpu_backend.py runs end to end (tiny shape, memory children included)."""
    pytest.importorskip("salt_kernels._C")
    from salt_kernels.backends import extension
    if not extension.has_kernel("cpu"):
        pytest.skip("extension built without CPU kernels")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_cpu_backend as script
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(script, "SHAPES", [("tiny", 70, 24, 40, 8, 2)])
    assert script.main(["--min-time", "0.01", "--threads", str(torch.get_num_threads()), "--memory-runs", "1"]) == 0
    out = capsys.readouterr().out
    for needle in ("tiny: M=70", "cpu over chain", "cpu over reference", "bound (floor)",
                   "peak extra memory fwd+bwd (MiB, median of 1 processes): chain"):
        assert needle in out, needle


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU timing, peak memory, roofline)")
def test_cli_smoke_on_cuda(tmp_path, capsys):
    """The GPU path: do_bench timing, CUDA peak memory, bf16 verification, roofline columns."""
    argv = ["--device", "cuda", "--presets", "smoke", "--min-time", "0.01", "--no-progress",
            "--bandwidth", "1000", "--output", str(tmp_path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "% BW" in out
    rows = _csv_rows(tmp_path / "results.csv")
    assert {r["device"] for r in rows} == {"cuda"}
    for r in rows:
        assert float(r["time_ms"]) > 0
        if r["mode"] == "fwd+bwd":
            assert float(r["peak_mem_MiB"]) > 0
        if r["kind"] == "salt":
            assert 0 < float(r["roofline_fraction"]) and float(r["achieved_GBps"]) > 0
