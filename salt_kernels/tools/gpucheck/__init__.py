"""The GPU check: one command that proves the GPU path on a fresh CUDA machine.

    python -m salt_kernels.tools.gpucheck --out DIR            # on a GPU: < 9.5 minutes on one H100/H200
    python -m salt_kernels.tools.gpucheck --out DIR --dry-run  # on CPU: the same steps, tiny, interpreted

It needs CUDA torch, Triton and nvcc, and no network. Each step of :data:`STEPS` runs in
its own process, with its own time budget (the process group is killed past it) and its
output captured in ``DIR/logs/STEP.log``. It writes ``DIR/report.md`` (pass/fail per
step and the figures), ``DIR/report.json`` (every figure) and the benchmark plots under
``DIR/bench/``, and exits non-zero if any step failed. ``--dry-run`` walks the same
steps on CPU under the Triton interpreter at tiny sizes (no extension rebuild when one
is present); CI runs it (tests/test_gpucheck.py). See docs/gpu.md.

Layout: :mod:`.steps` (what each step does, its budget), :mod:`.process` (a step in its
own process group under its budget), :mod:`.report` (report.md and report.json); this
module runs them in order.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .process import REPO, TOTAL_BUDGET_S, Context, Step, run_child, run_step
from .report import write_report
from .steps import STEPS


def run_check(out, dry_run: bool, steps: list | None = None, only: list | None = None) -> int:
    ctx = Context(Path(out).resolve(), dry_run)
    ctx.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = []
    for step in steps or STEPS:
        if only and step.name not in only:
            continue
        print(f"== {step.name}: {step.title}", flush=True)
        record = run_step(step, ctx)
        print(f"   {record['status'].upper()} in {record['wall_s']} s: {record['summary']}", flush=True)
        records.append(record)
    ok = write_report(ctx, records, time.perf_counter() - started)
    print(f"wrote {ctx.out / 'report.md'} and report.json: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m salt_kernels.tools.gpucheck", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for report.md, report.json, logs/ and bench/")
    p.add_argument("--dry-run", action="store_true",
                   help="the same steps on CPU under the Triton interpreter, at tiny sizes")
    p.add_argument("--steps", default=None, help=f"comma-separated subset of {[s.name for s in STEPS]}")
    p.add_argument("--run-step", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_step:
        step = next(s for s in STEPS if s.name == args.run_step)
        return run_child(step, Context(Path(args.out).resolve(), args.dry_run))
    only = [s.strip() for s in args.steps.split(",")] if args.steps else None
    unknown = [s for s in only or [] if s not in {st.name for st in STEPS}]
    if unknown:
        p.error(f"--steps: unknown step(s) {unknown}; choose from {[s.name for s in STEPS]}")
    return run_check(args.out, args.dry_run, only=only)


__all__ = ["REPO", "STEPS", "TOTAL_BUDGET_S", "Context", "Step", "main", "run_check", "run_step", "write_report"]
