"""python -m salt_kernels.tools.gpucheck: the dry run (the same steps on CPU under the Triton
interpreter, tiny sizes) end to end, and the runner's handling of failing and overrunning
steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from salt_kernels.tools import gpucheck
from salt_kernels.tools.gpucheck import steps
from salt_kernels.ops.dispatch import AUTO_POLICY
from salt_kernels.tools.gpucheck import STEPS, Step, run_check

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
    assert all(status[n] == "pass" for n in ("environment", "build", "tests", "compile", "bench")), status
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


def test_budgets_fit_the_gpu_time():
    # one command on the lent GPU machine runs at most 10 minutes, the wheel install included
    assert sum(s.budget_s for s in STEPS) <= gpucheck.TOTAL_BUDGET_S <= 9.5 * 60
    assert len({s.name for s in STEPS}) == len(STEPS)


def test_unknown_step_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        gpucheck.main(["--out", str(tmp_path), "--steps", "nope"])


def test_tests_step_stops_before_its_budget_and_counts_what_ran(tmp_path, monkeypatch):
    """A test run that would overrun the step's budget is interrupted 25 s before it;
    pytest still writes its report, so the tests that ran are counted (and it fails)."""
    suite = tmp_path / "suite" / "test_slow.py"
    suite.parent.mkdir()
    suite.write_text("import time\n\ndef test_a():\n    pass\n\ndef test_b():\n    pass\n\n"
                     "def test_c():\n    time.sleep(120)\n")
    monkeypatch.setattr(steps, "DRY_TEST_ARGS", [str(suite)])
    monkeypatch.setattr(steps, "STEPS", [Step("tests", "tests", 60, 35)])  # stopped at 35 - 25 = 10 s
    result = steps.step_tests(gpucheck.Context(tmp_path / "out", dry_run=True))
    figs = result["figures"]
    assert result["status"] == "fail" and figs["stopped"] is True, result
    assert figs["passed"] == 2 and "stopped at the budget" in result["summary"]
    assert figs["pytest_s"] < 40


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
    text = (ROOT / ".ci" / "gpu_check.sh").read_text()
    pkgs = next(line for line in text.splitlines() if line.startswith("PKGS=")).split("=", 1)[1].strip('"').split()
    assert set(steps.NEEDED_MODULES) <= set(pkgs)
    assert "-m salt_kernels.tools.gpucheck --out" in text
    proc = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
