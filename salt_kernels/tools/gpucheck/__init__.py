"""The GPU check: one command that proves the GPU path on a fresh CUDA machine.

    python -m salt_kernels.tools.gpucheck --out DIR [--warm-cache CACHE]  # on a GPU: <= 420 s of step budgets
    python -m salt_kernels.tools.gpucheck --out DIR --dry-run  # on CPU: the same steps, tiny, interpreted

It needs CUDA torch, Triton and nvcc, and no network. Each step of :data:`STEPS` runs in
its own process, with its own time budget (the process group is killed past it) and its
output captured in ``DIR/logs/STEP.log``. ``DIR/report.md`` (pass/fail per step and the
figures) and ``DIR/report.json`` (every figure) are rewritten before and after every
step, so a check stopped at any point leaves every finished step's figures; the
benchmark writes its rows under ``DIR/bench/`` as it times them. Exits non-zero if any
step failed. Triton compiles into ``DIR/triton-cache``, a copy of ``--warm-cache`` (built
off-GPU by ``python -m salt_kernels.tools.aot --warm-cache``) when given; the report
says how many kernels still compiled at run time. ``--dry-run`` walks the same steps
on CPU under the Triton interpreter at tiny sizes (no extension rebuild when one is
present); CI runs it (tests/test_gpucheck.py). See docs/gpu.md.

Layout: :mod:`.steps` (what each step does, its estimate and budget), :mod:`.workload`
(what the steps run: tests, sizes, presets), :mod:`.process`
(a step in its own process group under its budget), :mod:`.report` (report.md and
report.json), :mod:`.plan` (the Triton launches the check makes, recorded on CPU, and
the Triton cache of the run); this module runs them in order.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .plan import cache_counts, prepare_triton_cache
from .process import REPO, TOTAL_BUDGET_S, Context, Step, run_child, run_step
from .report import write_report
from .steps import STEPS


def run_check(out, dry_run: bool, steps: list | None = None, only: list | None = None,
              warm_cache=None) -> int:
    ctx = Context(Path(out).resolve(), dry_run)
    ctx.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    todo = [s for s in steps or STEPS if not only or s.name in only]
    cache = prepare_triton_cache(ctx, warm_cache)  # sets TRITON_CACHE_DIR for every step
    print(f"Triton cache: {cache['summary']}", flush=True)
    records = []
    extra = dict(triton_cache=cache)
    for i, step in enumerate(todo):
        pending = [s.name for s in todo[i:]]
        write_report(ctx, records, time.perf_counter() - started, pending, running=True, extra=extra)
        print(f"== {step.name}: {step.title}", flush=True)
        before = cache_counts(cache)
        record = run_step(step, ctx)
        cache["per_step"][step.name] = cache_counts(cache, before)
        print(f"   {record['status'].upper()} in {record['wall_s']} s: {record['summary']}", flush=True)
        records.append(record)
    ok = write_report(ctx, records, time.perf_counter() - started, extra=extra)
    print(f"wrote {ctx.out / 'report.md'} and report.json: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m salt_kernels.tools.gpucheck", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for report.md, report.json, logs/ and bench/")
    p.add_argument("--dry-run", action="store_true",
                   help="the same steps on CPU under the Triton interpreter, at tiny sizes")
    p.add_argument("--steps", default=None, help=f"comma-separated subset of {[s.name for s in STEPS]}")
    p.add_argument("--warm-cache", default=None, metavar="CACHE",
                   help="a Triton cache built off-GPU (python -m salt_kernels.tools.aot --warm-cache CACHE); "
                        "the check compiles into a copy of it")
    p.add_argument("--run-step", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_step:
        step = next(s for s in STEPS if s.name == args.run_step)
        return run_child(step, Context(Path(args.out).resolve(), args.dry_run))
    only = [s.strip() for s in args.steps.split(",")] if args.steps else None
    unknown = [s for s in only or [] if s not in {st.name for st in STEPS}]
    if unknown:
        p.error(f"--steps: unknown step(s) {unknown}; choose from {[s.name for s in STEPS]}")
    return run_check(args.out, args.dry_run, only=only, warm_cache=args.warm_cache)


__all__ = ["REPO", "STEPS", "TOTAL_BUDGET_S", "Context", "Step", "main", "run_check", "run_step", "write_report"]
