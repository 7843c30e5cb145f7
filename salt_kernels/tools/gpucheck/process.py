"""Process control of the GPU check: the context every step gets, a step's definition,
and running one step in its own process group under its time budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[3]
# The whole check on one GPU, extension build included: the sum of the step budgets may not
# exceed it. A lent GPU runs one command for at most 10 minutes; 420 s of budgets leaves
# room for the wheel install, the cache copy and the Python start-ups around the steps.
TOTAL_BUDGET_S = 420
# Each step's estimate (what it should take on one H100 with 16 cores) is at most this
# share of its budget, so that a slow machine or a cold start does not cost a step.
ESTIMATE_SHARE = 0.7
STEP_RESULT = "result.json"  # name of a step's result file under DIR/steps/STEP/
# pytest, interrupted near its step's budget, gets this long to print its summary and
# write its JUnit file before it is killed; it ends PYTEST_GRACE_S + 10 s before the
# step's budget, so that the step itself can still read that file and report.
PYTEST_STOP_BEFORE_S = 25
PYTEST_GRACE_S = 15


@dataclass
class Context:
    out: Path
    dry_run: bool
    extra_env: dict = field(default_factory=dict)  # for every step's process (the Triton cache)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def step_dir(self, name: str) -> Path:
        d = self.out / "steps" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def env(self) -> dict:
        env = {**os.environ, **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        # The interpreter's own bin first: torch finds ninja (a pip package) on PATH only, and
        # without it the extension builds one file at a time, past the build budget.
        env["PATH"] = os.pathsep.join(filter(None, [os.path.dirname(sys.executable), env.get("PATH")]))
        if self.dry_run:
            env["TRITON_INTERPRET"] = "1"  # before triton is imported, in every child
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        return env


@dataclass
class Step:
    """One step. ``run(ctx)`` executes in a child process (``--run-step NAME``) and returns
    ``{"status": "pass" | "fail" | "skip", "summary": str, "figures": {...}}``.
    ``command`` replaces that child's command line (tests use it). ``estimate_s`` is what
    the step should take on one H100 with 16 cores, ``basis`` how that was reckoned;
    ``budget_s`` is at least ``estimate_s / ESTIMATE_SHARE`` (tests/test_gpucheck.py)."""
    name: str
    title: str
    budget_s: int  # on a GPU
    dry_budget_s: int  # in a dry run on 2 CPU cores
    run: Callable[[Context], dict] | None = None
    estimate_s: int = 0
    basis: str = ""
    # the figures of a step stopped before it wrote its result (e.g. the benchmark's rows so far)
    salvage: Callable[[Context], dict] | None = None
    command: Callable[[Context], list] | None = None
    env: dict = field(default_factory=dict)  # on top of Context.env(), for this step's process

    def argv(self, ctx: Context) -> list:
        if self.command is not None:
            return self.command(ctx)
        return [sys.executable, "-m", "salt_kernels.tools.gpucheck", "--run-step", self.name, "--out", str(ctx.out)] + (
            ["--dry-run"] if ctx.dry_run else [])


def _result(status: str, summary: str, **figures) -> dict:
    return {"status": status, "summary": summary, "figures": figures}


def _sh(cmd, timeout=60, **kw) -> tuple[int, str]:
    """Run a helper command; (returncode, stdout+stderr). Missing programs give rc 127."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        return p.returncode, p.stdout + p.stderr
    except FileNotFoundError as exc:
        return 127, str(exc)


def _echo(cmd, **kw) -> int:
    """Run a command with its output going to this step's log; its return code."""
    print("$", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, **kw).returncode


def _sigint_default() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and the
    # child would inherit that: Python then installs no KeyboardInterrupt handler and the
    # stop below could not make pytest write its report.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _echo_until(cmd, deadline_s: float, grace_s: float = PYTEST_GRACE_S, **kw) -> tuple[int, bool]:
    """``_echo`` with a deadline: past it the command gets SIGINT (pytest then stops, prints
    its summary and writes its report) and, ``grace_s`` later, SIGKILL. (returncode, stopped)."""
    print("$", " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.Popen(cmd, preexec_fn=_sigint_default if os.name == "posix" else None, **kw)
    try:
        return proc.wait(timeout=max(deadline_s, 1)), False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=grace_s), True
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(), True


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_step(step: Step, ctx: Context) -> dict:
    """Run one step in its own process group under its budget; its record for the report."""
    budget = step.dry_budget_s if ctx.dry_run else step.budget_s
    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{step.name}.log"
    result_path = ctx.step_dir(step.name) / STEP_RESULT
    result_path.unlink(missing_ok=True)
    started = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(step.argv(ctx), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**ctx.env(), **step.env}, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.wait()
    wall = time.perf_counter() - started
    record = dict(name=step.name, title=step.title, budget_s=budget, wall_s=round(wall, 1), returncode=rc,
                  log=str(log_path.relative_to(ctx.out)))
    if result_path.exists():
        record.update(json.loads(result_path.read_text()))
    else:
        record.update(status="fail", summary=f"exit status {rc}", figures={})
        if step.salvage is not None:
            try:
                record["figures"] = step.salvage(ctx)["figures"]
            except Exception as exc:  # nothing to salvage: the failure says enough
                record["figures"] = dict(salvage_error=f"{type(exc).__name__}: {exc}")
    if timed_out:
        record.update(status="fail", summary=f"timed out after {budget} s (budget); " + record["summary"])
    elif rc != 0 and record["status"] != "fail":
        record.update(status="fail", summary=f"exit status {rc}; " + record["summary"])
    tail = log_path.read_text(errors="replace")[-3000:]
    if record["status"] == "fail":
        record["log_tail"] = tail
    return record


def run_child(step: Step, ctx: Context) -> int:
    """``--run-step NAME`` (in the step's own process): run it and write its result for
    :func:`run_step`."""
    try:
        result = step.run(ctx)
    except Exception as exc:
        traceback.print_exc()
        result = _result("fail", f"{type(exc).__name__}: {exc}")
    (ctx.step_dir(step.name) / STEP_RESULT).write_text(json.dumps(result, indent=1, default=str))
    print(f"[{step.name}] {result['status']}: {result['summary']}", flush=True)
    return 0


def _num(v):
    try:
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None
