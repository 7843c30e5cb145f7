"""python -m salt_kernels.tools.gpucheck: the dry run (the same steps on CPU under the Triton
interpreter, tiny sizes) end to end, and the runner's handling of failing and overrunning
steps."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from salt_kernels.tools import gpucheck
from salt_kernels.tools.gpucheck import steps
from salt_kernels.ops.dispatch import AUTO_POLICY
from salt_kernels.tools.gpucheck import STEPS, Step, run_check
from subprocess_testing import kill_when

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck")
    proc = subprocess.run([sys.executable, "-m", "salt_kernels.tools.gpucheck", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    return out, proc


@pytest.mark.slow  # the whole dry run: CI's slow-tests job
def test_dry_run_passes_every_step(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and report["dry_run"] is True
    # the same steps, in the same order, as a GPU run
    assert [s["name"] for s in report["steps"]] == [s.name for s in STEPS]
    status = {s["name"]: s["status"] for s in report["steps"]}
    # what a CPU can do passes; only CUDA-graph capture and the 2-GPU guard are skipped
    assert all(status[n] == "pass" for n in ("environment", "build", "numerics", "tests", "compile", "bench")), status
    assert status["cudagraph"] == "skip" and status["multigpu"] == "skip"
    for s in report["steps"]:
        assert 0 < s["wall_s"] <= s["budget_s"]
        assert (out / s["log"]).stat().st_size > 0


@pytest.mark.slow  # the whole dry run: CI's slow-tests job
def test_dry_run_figures(dry_run):
    out, _ = dry_run
    steps = {s["name"]: s for s in json.loads((out / "report.json").read_text())["steps"]}
    tests = steps["tests"]["figures"]
    assert tests["passed"] > 0 and tests["failed"] == 0
    compiled = steps["compile"]["figures"]
    for backend in ("reference", "cpu", "triton"):
        if backend in compiled:
            assert compiled[backend]["recompiles"] == 0, compiled[backend]
    assert "reference" in compiled
    bench = steps["bench"]["figures"]
    assert bench["rows"] and all(r["backend"] and r["mode"] in ("fwd", "fwd+bwd") for r in bench["rows"])
    ref = bench["by_method"]["reference fwd"]
    assert ref["geomean_speedup_vs_reference"] == pytest.approx(1.0)
    assert any(m["geomean_speedup_vs_reference"] for k, m in bench["by_method"].items() if k != "reference fwd")
    assert bench["plots"] and all((out / p).stat().st_size > 0 for p in bench["plots"])
    # the auto policy the timings support (what fills AUTO_POLICY["cuda"] on a GPU), next to the table's
    policy = bench["measured_auto_policy"]
    assert policy and policy[-1][0] is None and all(order[-1] == "reference" for _, order in policy)
    assert [list(o) for _, o in bench["auto_policy"]] == [list(o) for _, o in AUTO_POLICY["cpu"]]
    md = (out / "report.md").read_text()
    assert md.startswith("# salt_kernels GPU check: PASS")
    for s in STEPS:
        assert f"| {s.name} |" in md
    assert "speed-up vs the reference chain" in md and "![" in md
    assert "policy these timings support" in md and "(None, ('" in md


def _cmd(code):
    return lambda ctx: [sys.executable, "-c", code]


def test_failing_or_overrunning_step_fails_the_check(tmp_path):
    steps = [
        Step("fine", "exits 0 but writes no result", 30, 30, command=_cmd("print('hello')")),
        Step("crash", "exits 3", 30, 30, command=_cmd("import sys; print('boom'); sys.exit(3)")),
        Step("slow", "overruns its budget", 1, 1, command=_cmd("import time; time.sleep(60)")),
    ]
    assert run_check(tmp_path, dry_run=True, steps=steps) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    by = {s["name"]: s for s in report["steps"]}
    assert report["ok"] is False
    assert all(s["status"] == "fail" for s in by.values())  # no result written is a failure too
    assert "exit status 3" in by["crash"]["summary"] and "boom" in by["crash"]["log_tail"]
    assert "timed out after 1 s" in by["slow"]["summary"] and by["slow"]["wall_s"] < 30
    assert (tmp_path / "report.md").read_text().startswith("# salt_kernels GPU check: FAIL")


def test_stopped_bench_step_still_reports_its_rows(tmp_path):
    """The benchmark writes its rows after every shape; a bench step stopped at its
    budget is a failure whose figures still hold those rows."""
    rows = [dict(backend="reference", kind="salt", preset="p", layer="l", M=8, K=4, D=4, r=2, r_lora=1, mode=m,
                 time_ms=1.0, speedup_vs_reference=1.0, roofline_fraction=None, note=None) for m in ("fwd", "fwd+bwd")]
    write = (f"import json, os, time; os.makedirs({str(tmp_path / 'bench')!r}, exist_ok=True); "
             f"json.dump(dict(rows={rows!r}, complete=False), open({str(tmp_path / 'bench' / 'results.json')!r}, 'w'));"
             " time.sleep(60)")
    step = Step("bench", "times, then overruns", 3, 3, command=_cmd(write), salvage=steps.bench_figures)
    assert run_check(tmp_path, dry_run=True, steps=[step]) == 1
    (record,) = json.loads((tmp_path / "report.json").read_text())["steps"]
    assert record["status"] == "fail" and "timed out after 3 s" in record["summary"]
    assert len(record["figures"]["rows"]) == 2 and "reference fwd" in record["figures"]["by_method"]


def test_budgets_fit_the_gpu_time():
    """The step budgets total at most 420 s, each from a stated estimate at most 70 % of it;
    pytest, stopped before the tests step's budget, is killed before it too."""
    from salt_kernels.tools.gpucheck import process

    assert sum(s.budget_s for s in STEPS) <= gpucheck.TOTAL_BUDGET_S <= 420
    assert len({s.name for s in STEPS}) == len(STEPS)
    for s in STEPS:
        assert s.basis and 0 < s.estimate_s <= process.ESTIMATE_SHARE * s.budget_s, s
    assert process.PYTEST_GRACE_S + 5 <= process.PYTEST_STOP_BEFORE_S
    # what only a GPU can tell comes first, the broad test selection last
    assert [s.name for s in STEPS] == ["environment", "build", "numerics", "cudagraph", "multigpu", "bench",
                                       "compile", "tests"]


def test_docs_show_each_step_estimate_and_budget():
    """docs/gpu.md's table of steps gives each step's estimate and budget as STEPS has them."""
    text = (ROOT / "docs" / "gpu.md").read_text()
    for s in STEPS:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{s.name}` |")), None)
        assert row is not None, s.name
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-2:] == [f"{s.estimate_s} s", f"{s.budget_s} s"], (s.name, cells[-2:])
    assert f"{sum(s.budget_s for s in STEPS)} s" in text


def test_report_is_rewritten_around_every_step(tmp_path):
    """Before each step the report shows it running and the rest not run; a check killed
    there keeps the report of every finished step."""
    seen = []
    probe = (f"import json; r = json.load(open({str(tmp_path / 'report.json')!r})); "
             "print(r['running'], [s['name'] for s in r['steps']], r['pending'])")
    steps = [Step("one", "first", 30, 30, command=_cmd("print('one')")),
             Step("two", "reads the report", 30, 30, command=_cmd(probe))]
    run_check(tmp_path, dry_run=True, steps=steps)
    seen = (tmp_path / "logs" / "two.log").read_text()
    assert "two ['one'] ['two']" in seen  # while step two ran: one finished, two running


def test_killed_dry_run_leaves_the_finished_steps(tmp_path):
    """A dry run killed mid-way (here: during its third step) leaves report.json and
    report.md with every step finished before it, the running one and those not run."""
    report = tmp_path / "report.json"
    kill_when([sys.executable, "-m", "salt_kernels.tools.gpucheck", "--dry-run", "--out", str(tmp_path)],
              lambda: report.exists() and len(json.loads(report.read_text())["steps"]) >= 2, ROOT)
    data = json.loads(report.read_text())
    names = [s.name for s in STEPS]
    done = [s["name"] for s in data["steps"]]
    assert done == names[:len(done)] and len(done) >= 2 and data["complete"] is False
    assert data["pending"] == names[len(done):] and data["ok"] is False
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# salt_kernels GPU check: INCOMPLETE")
    assert all(f"| {n} | PASS |" in md for n in done[:2]) and "| tests | NOT RUN |" in md


def test_environment_checks_name_the_fix():
    """Each problem the environment step checks fails it with a message saying what to do."""
    old = steps.check_setuptools("65.5.0", "77")
    assert "65.5.0 < 77" in old and "pip install 'setuptools>=77'" in old and ".whl" in old
    assert steps.check_setuptools("77.0.3", "77") is None and steps.check_setuptools("80.9", "77") is None
    assert "setuptools missing" in steps.check_setuptools(None, "77")
    mismatch = steps.check_cuda_match("Cuda compilation tools, release 12.4, V12.4.131", "13.0")
    assert "CUDA 12.4" in mismatch and "13.0" in mismatch and "CUDA_HOME" in mismatch
    assert steps.check_cuda_match("Cuda compilation tools, release 13.0, V13.0.88", "13.0") is None
    assert steps.check_cuda_match("Cuda compilation tools, release 13.1, V13.1.2", "13.0") is None  # same major
    assert "no nvcc" in steps.check_cuda_match(None, "13.0")
    missing = steps.check_modules(["hypothesis"])
    assert "hypothesis" in missing and "pip install hypothesis" in missing
    assert "pip install ninja" in steps.check_ninja(None)
    # pyproject.toml's build requirement is what the check asks for
    assert steps._version_tuple(steps.setuptools_required()) >= (77, 0, 0)


@pytest.mark.parametrize("problem", ["old setuptools", "missing module"])
def test_environment_step_fails_in_seconds(problem, tmp_path, monkeypatch):
    """The environment step itself (dry run: no GPU checks) fails, naming the fix, for an
    old setuptools or a missing module."""
    import time

    if problem == "old setuptools":
        monkeypatch.setattr(steps, "setuptools_required", lambda: "999")
        expect = "pip install 'setuptools>=999'"
    else:
        monkeypatch.setattr(steps, "NEEDED_MODULES", steps.NEEDED_MODULES + ("no_such_module_xyz",))
        expect = "pip install no_such_module_xyz"
    t0 = time.perf_counter()
    result = steps.step_environment(gpucheck.Context(tmp_path, dry_run=True))
    assert result["status"] == "fail" and expect in result["summary"], result["summary"]
    assert time.perf_counter() - t0 < 30


def test_cuda_mismatch_fails_the_gpu_environment():
    """On a GPU machine an nvcc of another CUDA major than torch's fails the step."""
    figs = dict(gpus=[{"name": "H100"}], triton="3.6.0", nvcc="Cuda compilation tools, release 12.8, V12.8.93",
                torch_cuda="13.0", missing_modules=[], setuptools="80.0", setuptools_required="77", ninja="/bin/ninja")
    problems = steps.environment_problems(figs, dry_run=False)
    assert len(problems) == 1 and "nvcc is CUDA 12.8 but torch was built with CUDA 13.0" in problems[0]
    assert steps.environment_problems({**figs, "nvcc": figs["nvcc"].replace("12.8", "13.0")}, dry_run=False) == []


def test_unknown_step_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        gpucheck.main(["--out", str(tmp_path), "--steps", "nope"])


def test_tests_step_stops_before_its_budget_and_counts_what_ran(tmp_path, monkeypatch):
    """A test run that would overrun the step's budget is interrupted 25 s before it;
    pytest still writes its report, so the tests that ran are counted (and it fails)."""
    suite = tmp_path / "suite" / "test_slow.py"
    suite.parent.mkdir()
    text = "import time\n\ndef test_a():\n    pass\n\ndef test_b():\n    pass\n\ndef test_c():\n    time.sleep({})\n"
    ctx = gpucheck.Context(tmp_path / "out", dry_run=True)
    # The interrupt must come while test_c sleeps, not while the child pytest still starts
    # (then it writes no report): on a loaded machine that start takes many seconds, so the
    # deadline is 10 s or four times a measured start (collecting the same suite), whichever
    # is longer.
    suite.write_text(text.format(0))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", str(suite)],
                   cwd=steps.REPO, env=dict(ctx.env(), PYTHONDONTWRITEBYTECODE="1"), capture_output=True,
                   check=True, timeout=600)
    budget = steps.PYTEST_STOP_BEFORE_S + max(10, math.ceil(4 * (time.perf_counter() - t0)))
    suite.write_text(text.format(2 * budget))  # past the budget: only the stop ends it
    monkeypatch.setattr(steps, "DRY_TEST_ARGS", [str(suite)])
    monkeypatch.setattr(steps, "STEPS", [Step("tests", "tests", 60, budget)])  # stopped at budget - 25 s
    # As CI runs it (a background job of a shell without job control): SIGINT ignored,
    # which a child inherits unless the check restores it.
    old_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = steps.step_tests(ctx)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    figs = result["figures"]
    assert result["status"] == "fail" and figs["stopped"] is True, result
    assert figs["passed"] == 2 and "stopped at the budget" in result["summary"]
    assert figs["pytest_s"] < budget - 10  # killed, at the latest, 10 s before the step's budget


def test_triton_spills_finds_compiled_kernels(monkeypatch):
    """Registers and spills are read from every kernel cache of both Triton modules; a
    JITFunction (which has a .fn, the Python function) is read itself, an Autotuner
    through its .fn."""
    from types import SimpleNamespace

    pytest.importorskip("triton")
    from salt_kernels.backends.triton import kernels as triton_kernels, multi as triton_multi

    def jit(name, regs):
        kernel = SimpleNamespace(n_regs=regs, n_spills=0)
        return SimpleNamespace(__name__=name, fn=lambda: None, device_caches={0: ({"key": kernel}, None)})

    monkeypatch.setattr(triton_kernels, "_fake_jit", jit("_fake_jit", 100), raising=False)
    monkeypatch.setattr(triton_kernels, "_fake_tuned", SimpleNamespace(fn=jit("_fake_tuned", 120)), raising=False)
    monkeypatch.setattr(triton_multi, "_fake_multi", jit("_fake_multi", 90), raising=False)
    found = {s["kernel"]: s["n_regs"] for s in steps.triton_spills()}
    assert {"_fake_jit": 100, "_fake_tuned": 120, "_fake_multi": 90}.items() <= found.items()


def test_offline_script_brings_every_module_the_check_needs():
    """.ci/gpu_check.sh installs (from prepared wheels) each module the environment step
    requires, then runs the check from this checkout."""
    import re

    text = (ROOT / ".ci" / "gpu_check.sh").read_text()
    pkgs = next(line for line in text.splitlines() if line.startswith("PKGS=")).split("=", 1)[1].strip('"').split()
    assert set(steps.NEEDED_MODULES) <= {re.split("[<>=]", p)[0] for p in pkgs}
    assert f"setuptools>={steps.setuptools_required()}" in pkgs  # the build's own requirement
    assert "--warm-cache" in text and "triton-cache.tar.xz" in text
    assert "-m salt_kernels.tools.gpucheck --out" in text
    proc = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
