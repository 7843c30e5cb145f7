"""salt-bench (the package's main job) and the benchmark toolkit: it verifies before it
times, refuses to time a wrong backend (exit code 1), writes CSV, JSON and plots, its
ratios and baselines compute what they claim, and the scripts under benchmarks/ use
its timing. Runs the CLI on the seconds-long ``smoke`` preset; no timing is asserted."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
import types

import pytest
import torch
import torch.nn.functional as F

from salt_kernels.ops import dispatch
from salt_kernels.tools import bench
from salt_kernels.backends import reference
from salt_kernels.tools.bench import plots, presets, report, timing
from salt_kernels.tools.bench.baselines import (official_rebuild_flops, official_salt_forward, official_salt_params,
                                          unfused_salt_chain)
from salt_kernels.tools.bench.report import Row, policy_in_words
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
    assert set(times) == {"a", "b"} and all(t.median > 0 and t.min <= t.median for t in times.values())
    assert times["a"].paired and times["a"].rounds == times["b"].rounds >= timing.MIN_ROUNDS
    assert len(calls) > 1
    samples = bench.sample_steps({"a": lambda: None}, 0.01, min_rounds=4)
    assert len(samples["a"]) >= 4 and all(t >= 0 for t in samples["a"])


def test_paired_ratio():
    """Round-by-round ratios: their median and quartiles; unpaired: ratio of medians."""
    base, other = bench.Timing([2.0, 4.0, 6.0, 10.0], paired=True), bench.Timing([1.0, 2.0, 2.0, 2.0], paired=True)
    r = bench.paired_ratio(base, other)  # per round: 2, 2, 3, 5
    assert (r.median, r.low, r.high) == (2.5, 2.0, 3.5) and r.spread == 0.75
    # the ratio of medians (5 / 2) differs from the median of ratios only by chance; unpaired:
    u = bench.paired_ratio(bench.Timing([2.0, 4.0, 6.0]), bench.Timing([1.0, 2.0, 4.0]))
    assert (u.median, u.low, u.spread) == (2.0, None, None)


def test_add_ratios_pairs_each_method_with_its_baselines():
    shape = bench.PRESETS["smoke"][0]
    by_name = {m.name: m for m in bench.build_methods("cpu", ["reference", "cpu"], auto=True)}
    samples = {"reference": [4.0, 8.0, 4.0], "cpu": [2.0, 2.0, 4.0], "auto": [1.0, 4.0, 2.0],
               bench.DENSE: [1.0, 1.0, 1.0], bench.OFFICIAL: [8.0, 8.0, 8.0]}
    rows = [Row(shape, by_name[n], "fwd", timing=bench.Timing(v, paired=True)) for n, v in samples.items()]
    rows.append(Row(shape, by_name["cpu"], "fwd+bwd", timing=bench.Timing([1.0], paired=True)))  # no reference
    bench.add_ratios(rows)
    got = {r.method.name: r for r in rows if r.mode == "fwd"}
    assert got["cpu"].vs_reference.median == 2.0  # rounds: 2, 4, 1
    assert got["auto"].vs_reference.median == 2.0 and got["auto"].vs_reference.high == 3.0  # 4, 2, 2
    assert got["reference"].vs_reference.median == 1.0 and got["reference"].vs_reference.spread == 0.0
    assert got["cpu"].vs_official.median == 4.0 and got["cpu"].vs_dense.median == 0.5
    assert rows[-1].vs_reference is None


def test_unfused_chain_matches_reference():
    """The issue's literal baseline computes the same layer as the reference backend."""
    t = make_salt_inputs((37,), 24, 20, 6, 3, torch.float64, seed=2)
    args = [t[k] for k in ("x", "U", "V", "sigma", "X", "Y", "bias")]
    torch.testing.assert_close(unfused_salt_chain(*args), reference.salt_linear_2d(*args, 1.0))


def test_bench_cpu_backend_script(monkeypatch, capsys):
    """benchmarks/bench_cpu_backend.py runs end to end (tiny shape, memory children
    included) and times with the toolkit's timing, not a loop of its own."""
    pytest.importorskip("salt_kernels._C")
    from salt_kernels.backends import extension
    if not extension.has_kernel("cpu"):
        pytest.skip("extension built without CPU kernels")
    script = _import_script("bench_cpu_backend")
    assert script.time_steps is timing.time_steps
    assert script.main(["--shape", "70,24,40,8,2", "--min-time", "0.001", "--threads", "1", "--memory-runs", "1",
                        "--matmul-size", "64"]) == 0
    out = capsys.readouterr().out
    for needle in ("24->40: M=70", "×chain", "×reference", "GEMM floor", "fwd+bwd", "of matmul",
                   "peak extra memory fwd+bwd (MiB, median of 1 processes): chain"):
        assert needle in out, needle


def test_bench_variants_script(capsys):
    """benchmarks/bench_variants.py: tiny sizes, one table through the toolkit."""
    script = _import_script("bench_variants")
    assert script.time_steps is timing.time_steps
    script.main(["--min-time", "0.005", "--rows", "8", "--size", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert out.count("×dense") == 3 and "SALTConv2d r=32 direct" in out and "nn.Linear 768->768" in out


def test_bench_host_overhead_script():
    """benchmarks/bench_host_overhead.py runs end to end (its own process: it sets
    TRITON_INTERPRET and swaps the launcher's launch function for a no-op) and prints its
    summary line for the default shape (with the PEFT lines) and for a bf16 decode plan
    with a split shrink."""
    pytest.importorskip("triton")
    pytest.importorskip("peft")
    root = Path(__file__).resolve().parents[1]
    for extra in (["--peft"], ["--shape", "1,600,300,24,4", "--dtype", "bfloat16"]):
        out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_host_overhead.py"), "--min-time", "0.005",
                              *extra], capture_output=True, text=True, cwd=root, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(root)})
        assert out.returncode == 0, out.stderr[-3000:]
        assert re.search(r"^host overhead: forward \d+ us, forward\+backward \d+ us per layer call$", out.stdout, re.M)
        assert "Triton launches replaced by no-ops" in out.stdout
        peft_lines = re.findall(r"^  PEFT, per layer of 8 stacked +fwd(?:\+bwd)? +SALT +[\d.]+ us +LoRA +[\d.]+ us", out.stdout,
                                re.M)
        assert len(peft_lines) == (2 if "--peft" in extra else 0), out.stdout


def _import_script(name):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_benchmark_scripts_use_the_toolkit():
    """No script under benchmarks/ times on its own: no perf_counter, timeit or
    torch.utils.benchmark, and each imports salt_kernels.tools.bench."""
    for path in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"):
        text = path.read_text()
        assert "salt_kernels.tools.bench" in text or "from salt_kernels import" in text and "bench" in text, path
        for own_timer in ("perf_counter", "timeit", "torch.utils.benchmark", "time.time("):
            assert own_timer not in text, (path.name, own_timer)


def test_help_is_plain_text_and_every_option_has_help():
    text = bench.parser().format_help()
    for markup in ("``", ":func:", ":mod:", ":class:", "**", "DESIGN.md"):
        assert markup not in text, markup
    assert re.search(r"\bdocs/design\.md\b", text)
    for action in bench.parser()._actions:
        assert action.help and action.help.strip(), action.option_strings


def test_help_runs_as_a_module():
    """``python -m salt_kernels.tools.bench --help`` (what the console script runs)."""
    out = subprocess.run([sys.executable, "-m", "salt_kernels.tools.bench", "--help"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.startswith("usage: salt-bench") and "--json FILE" in out and "--device DEVICE" in out


def test_auto_vs_reference_preset_has_the_target_shapes():
    got = {(s.K, s.D, s.r, s.M) for s in bench.PRESETS["auto-vs-reference"]}
    want = {(K, D, r, M) for K, D, r in [(768, 768, 64), (768, 3072, 64), (4096, 4096, 128)]
            for M in (16, 256, 1024, 4096)}
    assert got == want
    assert presets.preset_baselines(["auto-vs-reference"]) == []
    assert presets.preset_baselines(["auto-vs-reference", "smoke"]) == ["dense", "official"]


def test_auto_vs_reference_preset_runs(monkeypatch, tmp_path, capsys):
    """The preset on tiny sizes: auto timed as its own entry next to every backend,
    ratios to reference in both modes, no baselines, the summary line, JSON and CSV."""
    tiny = [presets.Shape("auto-vs-reference", s.layer, max(1, s.M // 256), s.K // 64, s.D // 64, s.r // 16,
                          s.rl // 4) for s in bench.PRESETS["auto-vs-reference"][::4]]
    monkeypatch.setitem(presets.PRESETS, "auto-vs-reference", tiny)
    out_json = tmp_path / "sub" / "auto.json"
    argv = ["--presets", "auto-vs-reference", "--min-time", "0.005", "--no-progress", "--threads", "1",
            "--output", str(tmp_path), "--json", str(out_json)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "auto vs reference" in out and "fwd+bwd  worst" in out and f"of {len(tiny)} shapes" in out
    assert "auto policy: on this machine, auto should use " in out
    assert re.search(r"\n  auto (uses .* \(AUTO_POLICY in|does the same at these row counts)", out)
    assert "0.005 s per measurement is short and noisy" in out
    data = json.loads(out_json.read_text())
    assert data["command"] == ["salt-bench", *argv] and data["environment"]["device"] == "cpu"
    names = set(dispatch.available_backends("cpu")) - {"triton"}
    rows = data["rows"]
    assert {r["backend"] for r in rows} == names | {"auto"}
    assert len(rows) == len(tiny) * (len(names) + 1) * 2
    for r in rows:
        assert r["time_ms"] > 0 and r["time_min_ms"] <= r["time_ms"] and len(r["samples_s"]) == r["rounds"]
        assert r["speedup_vs_reference_p25"] <= r["speedup_vs_reference"] <= r["speedup_vs_reference_p75"]
        if r["backend"] == "auto":
            assert r["resolves_to"] in names
        # the ratio is the median of the per-round ratios of the samples in the file
        ref = next(q for q in rows
                   if q["backend"] == "reference" and all(q[k] == r[k] for k in ("M", "K", "D", "mode")))
        expect = bench.paired_ratio(bench.Timing(ref["samples_s"], True), bench.Timing(r["samples_s"], True))
        assert r["speedup_vs_reference"] == pytest.approx(expect.median)
    csv_rows = _csv_rows(tmp_path / "results.csv")
    assert len(csv_rows) == len(rows) and (tmp_path / "speedup_vs_reference.png").exists()
    assert not (tmp_path / "speedup_vs_official.png").exists()  # the official baseline was not run


def _rec(backend, M, speedup, mode="fwd", kind="salt"):
    return dict(backend=backend, kind=kind, M=M, mode=mode, speedup_vs_reference=speedup)


def test_measured_policy_rule():
    """A backend goes ahead of reference at a token count only where its geometric mean
    speed-up there (shapes x modes) is >= 1; equal orders merge; the last row is open."""
    recs = [_rec("reference", M, 1.0) for M in (16, 256, 4096)] + [
        _rec("auto", 16, 3.0),  # auto and the baselines never vote
        _rec("dense nn.Linear", 16, 5.0, kind="baseline"),
        _rec("cpu", 16, 1.2), _rec("cpu", 16, 0.7, "fwd+bwd"),  # geomean 0.92: behind reference
        _rec("cpu", 256, "0.9"), _rec("cpu", 256, "0.95", "fwd+bwd"),  # CSV strings
        _rec("cpu", 4096, 1.3), _rec("cpu", 4096, 0.8, "fwd+bwd"),  # geomean 1.02: ahead
        _rec("triton", 4096, 2.0), _rec("triton", 4096, ""),  # an empty cell is skipped
    ]
    assert bench.measured_policy(recs) == ((256, ("reference",)), (None, ("triton", "cpu", "reference")))
    assert bench.measured_policy([_rec("cpu", 16, 1.1)]) == ((None, ("cpu", "reference")),)
    assert bench.measured_policy([_rec("reference", 16, 1.0)]) == ()


def test_policy_in_words():
    assert policy_in_words(((16, ("reference",)), (None, ("cpu", "reference")))) == \
        "reference up to 16 rows and cpu above"
    assert policy_in_words(((None, ("reference",)),)) == "reference at every row count"
    assert policy_in_words(((1, ("cpu",)), (64, ("triton", "cpu")), (None, ("reference",)))) == \
        "cpu up to 1 rows, triton up to 64 rows and reference above"


def test_policy_summary_compares_at_the_timed_row_counts(monkeypatch):
    """The measured policy is compared with auto's at the row counts timed: auto's rows
    beyond them do not make a difference."""
    shape = bench.PRESETS["smoke"][0]
    methods = {m.name: m for m in bench.build_methods("cpu", ["reference", "cpu"])}

    def rows(speedup):
        return [Row(shape, methods[n], "fwd", timing=bench.Timing([1.0]), vs_reference=bench.Ratio(r))
                for n, r in (("reference", 1.0), ("cpu", speedup))]
    monkeypatch.setitem(dispatch.AUTO_POLICY, "cpu", ((1024, ("reference",)), (None, ("cpu", "reference"))))
    same = report.policy_summary(rows(0.9), "cpu")  # smoke: M = 64
    assert "should use reference at every row count (timed at 64 rows" in same and "does the same" in same
    differs = report.policy_summary(rows(1.2), "cpu")
    assert "should use cpu at every row count" in differs
    assert "auto uses reference up to 1024 rows and cpu above (AUTO_POLICY in" in differs


def test_sample_steps_varies_the_order():
    """No step always follows the same one (the step after a memory-churning one pays
    for it): over the rounds each step is preceded by several different steps."""
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    bench.sample_steps(steps, 0.0, min_rounds=20, block=0.0)
    rounds = [calls[i:i + 4] for i in range(8, len(calls), 4)]  # after the two warm-up calls per step
    assert all(sorted(r) == list("abcd") for r in rounds)
    for name in "abcd":
        before = {r[r.index(name) - 1] for r in rounds if r.index(name) > 0}
        assert len(before) >= 2, (name, before)


def test_cpu_auto_policy_is_the_measured_one():
    """dispatch.AUTO_POLICY['cpu'] is what its documented measurement supports
    (docs/bench-cpu/auto-vs-reference: salt-bench --presets auto-vs-reference)."""
    rows = _csv_rows(Path(__file__).resolve().parents[1] / "docs/bench-cpu/auto-vs-reference/results.csv")
    assert {r["device"] for r in rows} == {"cpu"}
    assert bench.measured_policy(rows) == dispatch.AUTO_POLICY["cpu"]


def test_backends_past_their_rank_limit_are_skipped():
    """On a GPU the llama7b preset's r = 410 is past Triton's limit (256): that backend's
    rows say so instead of the run raising; auto and reference are timed."""
    methods = {m.name: m for m in bench.build_methods("cuda", ["triton", "reference"], auto=True)}
    wide, narrow = (presets.Shape("t", "wide", 16, 64, 64, r, 8) for r in (410, 64))
    assert methods["triton"].skip_reason(wide) == "skipped: rank 410 > 256, triton's limit"
    assert methods["triton"].skip_reason(narrow) is None
    assert methods["reference"].skip_reason(wide) is None and methods["auto"].skip_reason(wide) is None


def test_a_failing_method_is_reported_and_the_others_timed(capsys):
    """A method that raises gets a 'failed: ...' row in both modes; the others are timed."""
    def boom(**args):
        raise RuntimeError("kernel exploded\nsecond line")

    shape = bench.PRESETS["smoke"][1]
    ref = next(m for m in bench.build_methods("cpu", ["reference"]) if m.name == "reference")
    bad = bench.Method("broken", "salt", bench.salt_inputs, boom)
    rows = bench.run_benchmarks([shape], [ref, bad], "cpu", torch.float32, min_time=0.005, progress=False)
    by = {(r.method.name, r.mode): r for r in rows}
    assert by[("reference", "fwd")].timing and by[("reference", "fwd+bwd")].timing
    assert by[("broken", "fwd")].skip == "failed: RuntimeError: kernel exploded" and not by[("broken", "fwd")].timing


def test_one_input_copy_when_the_device_flushes_its_cache():
    """On CUDA do_bench flushes L2 before each call: target_bytes 0 there, one copy."""
    shape = bench.PRESETS["smoke"][1]
    ref = bench.build_methods("cpu", ["reference"])[0]
    assert len(bench.make_input_sets(ref, shape, torch.float32, "cpu", target_bytes=0)) == 1
    assert len(bench.make_input_sets(ref, shape, torch.float32, "cpu")) == 8  # tiny shape: 64 MiB is never reached


def test_skipped_baseline_is_reported(tmp_path, capsys):
    """A baseline skipped for its cost: the reason in the table and in CSV/JSON."""
    argv = FAST + ["--official-max-gflop", "0.0001", "--json", str(tmp_path / "r.json")]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    skipped = [r for r in rows if r["backend"] == bench.OFFICIAL]
    assert skipped and all(r["note"].startswith("skipped: rebuild") and r["time_ms"] is None for r in skipped)
    assert re.search(r"skipped: rebuild [0-9.]+ > 0.0001 GFLOP", capsys.readouterr().out)


@pytest.mark.parametrize("n_shapes", [2, 7])  # side by side; stacked
def test_plot_legend_clear_of_bars_and_skips_labelled_in_figure(n_shapes):
    shapes = [presets.Shape("t", f"layer{i}", 8, 16, 16, 4, 2) for i in range(n_shapes)]
    methods = bench.build_methods("cpu", ["reference"], auto=True)
    rows = []
    for i, s in enumerate(shapes):
        for m in methods:
            for mode in ("fwd", "fwd+bwd"):
                if m.name == bench.OFFICIAL and i == 0:
                    rows.append(Row(s, m, mode, skip="skipped: rebuild 275 > 20 GFLOP"))
                else:
                    rows.append(Row(s, m, mode, timing=bench.Timing([1.0 + len(m.name) / 10, 1.1], paired=True)))
    bench.add_ratios(rows)
    for attr, base, _ in plots.PLOTS:
        fig = plots.speedup_figure(rows, attr, base, "t")
        fig.canvas.draw()
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert sum("skipped: rebuild 275 > 20 GFLOP" in t for t in texts) == 2, (base, texts)  # fwd, fwd+bwd
        legend = fig.legends[0].get_window_extent()
        for ax in fig.axes:
            assert legend.y0 >= ax.get_window_extent().y1, base
        assert set(t.get_text() for t in fig.legends[0].get_texts()) == {m.name for m in methods} - {base}


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


def test_auto_choice_names_what_auto_resolves_to(monkeypatch):
    """The backend `auto` picks, passed the sizes a size policy asks for; unknown
    (None) rather than a guess when resolve_backend wants more."""
    shape = bench.PRESETS["smoke"][0]
    assert bench.auto_choice("cpu", shape) == dispatch.resolve_backend("auto", "cpu", rank=shape.r, M=shape.M)
    seen = {}

    def by_size(backend, device, rank=1, M=None, K=None):
        seen.update(M=M, K=K)
        return "reference"
    monkeypatch.setattr(dispatch, "resolve_backend", by_size)
    assert bench.auto_choice("cpu", shape) == "reference" and seen == dict(M=shape.M, K=shape.K)
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, device, rank=1, tokens=None: "reference")
    assert bench.auto_choice("cpu", shape) is None


def test_busy_cpu_times_with_one_thread(monkeypatch, capsys):
    """With every core already busy (load average >= cores), salt-bench times with one
    thread unless --threads says otherwise, and says so."""
    import os
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count()), 0.0, 0.0))
    try:
        torch.set_num_threads(2)
        assert bench.main(["--presets", "smoke", "--verify-only", "--backends", "reference"]) == 0
        assert torch.get_num_threads() == 1 and "so timing with 1 thread" in capsys.readouterr().out
        torch.set_num_threads(2)
        assert bench.main(["--presets", "smoke", "--verify-only", "--backends", "reference", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2 and "so timing with 1 thread" not in capsys.readouterr().out
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert bench.main(["--presets", "smoke", "--verify-only", "--backends", "reference"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_decode_shapes_are_also_timed_back_to_back(monkeypatch):
    """Decode shapes (M <= 64) ask time_steps for the back-to-back (no L2 flush) and CUDA
    graph timings; larger shapes do not. (On CPU time_steps leaves them unset: CPU calls
    always run back to back.)"""
    from salt_kernels.tools.bench import cli, methods

    asked = []
    real = cli.time_steps

    def spy(steps, device, min_time, **kw):
        asked.append(kw.get("back_to_back"))
        return real(steps, device, min_time, **kw)

    monkeypatch.setattr(cli, "time_steps", spy)
    shapes = [presets.Shape("t", "decode", 4, 32, 24, 8, 2), presets.Shape("t", "prefill", 65, 32, 24, 8, 2)]
    ms = methods.build_methods("cpu", ["reference"], baselines=())
    rows = cli.run_benchmarks(shapes, ms, "cpu", torch.float32, min_time=0.01, progress=False)
    assert asked == [True, True, False, False]  # (fwd, fwd+bwd) per shape
    assert all(r.timing.back_to_back is None and r.timing.graph is None for r in rows)
    assert timing.format_back_to_back(rows) is None


def test_back_to_back_timings_are_reported():
    """Rows carrying back-to-back and CUDA-graph timings get a line each (a method that
    cannot be captured shows '-'), and the figures go into the CSV/JSON records."""
    from salt_kernels.tools.bench import methods, report

    shape = presets.Shape("t", "decode", 1, 32, 24, 8, 2)
    m = methods.build_methods("cpu", ["reference"], baselines=("dense",))
    rows = [Row(shape, m[0], "fwd", timing=timing.Timing([20e-6], back_to_back=35e-6, graph=6e-6)),
            Row(shape, m[1], "fwd", timing=timing.Timing([10e-6], back_to_back=12e-6, graph=None))]
    text = timing.format_back_to_back(rows)
    lines = text.splitlines()
    assert "back to back" in lines[0] and len(lines) == 3
    assert re.search(r"20\.0 \|\s+35\.0 \|\s+6\.0$", lines[1]) and lines[2].rstrip().endswith("-")
    rec = report.row_record(rows[0], {}, {})
    assert rec["time_back_to_back_ms"] == pytest.approx(0.035) and rec["time_cuda_graph_ms"] == pytest.approx(0.006)
    assert "time_back_to_back_ms" in report.CSV_FIELDS and "time_cuda_graph_ms" in report.CSV_FIELDS


def test_cuda_graph_timing_is_none_when_capture_fails(monkeypatch):
    """A step that cannot be captured (it syncs, or compiles on the way) gives no graph
    figure rather than an error: the back-to-back figure stands alone."""
    def refuse(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    assert timing.cuda_graph_seconds(lambda: None, 0.01) is None
