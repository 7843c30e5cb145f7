"""The ``salt-bench`` command: verify every available backend, then time it against
the baselines (the module docstring of :mod:`salt_kernels.tools.bench` has the details;
``DESCRIPTION`` below is its plain-text form for ``--help``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ...ops import available_backends
from ...ops.dispatch import _BACKEND_MODULES, unavailable_reason
from .methods import AUTO, BASELINE_NAMES, REFERENCE, auto_choice, build_methods, is_decode, is_interpreted, \
    make_input_sets, make_step
from .plots import write_plots
from .presets import BASELINES, FULL_PRESETS, PRESETS, Shape, preset_baselines, select_shapes
from .report import MODES, Row, add_ratios, auto_summary, format_table, policy_summary, write_csv, write_json
from .timing import describe, environment, format_back_to_back, load_note, peak_bandwidth_gbps, \
    peak_memory_bytes, time_steps
from .verify import verification_passed, verify_backends

DESCRIPTION = """\
Verify every available SALT backend, then time it against the baselines.

1. Verify. Each backend that can run on the device is checked against the float64
   dense formula (forward and the gradients of x, sigma, X, Y and bias) on a few odd
   shapes. A backend that fails is never timed, and the exit code is 1.
2. Time forward (under no_grad) and forward+backward on shape presets named after
   real models: each verified backend, "auto" (what salt_linear picks by default),
   and the baselines: "reference" (the plain PyTorch chain, itself a backend),
   "dense nn.Linear" of the same size, and "official SALT" (the dense weight rebuilt
   from the full SVD every step). Also the peak memory of one forward+backward above
   its inputs.

Timing. CPU: all methods of a shape are timed in interleaved rounds (at least 15,
warm-up first, the order shuffled every round), so load from other processes hits
them alike; times are medians, and
each speed-up is the median of the per-round paired ratios, shown as "ratio±noise"
where the noise is half the interquartile range of those ratios. CUDA:
triton.testing.do_bench (CUDA events, L2 flushed before each call), medians; decode
shapes (M <= 64) also back to back without the flush (host cost included) and replayed
from a CUDA graph where the method can be captured. Inputs
rotate through several copies so that caches do not flatter small shapes. On a GPU,
SALT rows also report achieved bandwidth over the minimum bytes moved as a share of
the device's peak (see docs/design.md, "Performance model").

Examples:
  salt-bench --quick --output bench-out
  salt-bench --presets auto-vs-reference --min-time 2 --json auto.json
  salt-bench --presets tokens,decode,llama7b --dtype bf16 --output bench-gpu
"""


def min_bytes(shape: Shape, mode: str, elem: int) -> int:
    """Bytes a SALT layer must move at least (docs/design.md, "Performance model").
    Forward: read x and U, V once, write y. Backward adds: read dL/dy and U, V, write dx
    (Z is M x r, small)."""
    fwd = elem * (shape.M * shape.K + shape.M * shape.D + (shape.D + shape.K) * shape.r)
    return fwd if mode == "fwd" else 2 * fwd


def run_benchmarks(shapes, methods, device, dtype, *, min_time, bandwidth_gbps=None, progress=True,
                   deadline: float | None = None, on_shape=None) -> list[Row]:
    """Time every method on every shape in both modes (and its fwd+bwd peak memory).
    All methods of one shape and mode are timed together (:func:`timing.time_steps`),
    so on a shared CPU their ratios see the same load. ``deadline`` (a
    ``time.perf_counter()`` value): shapes not started by then are not timed (their rows
    say so). ``on_shape(rows)``: called with the rows so far (ordered, with ratios) after
    every shape, e.g. to write them, so that a run stopped mid-way keeps what it timed."""
    from tqdm import tqdm
    device = torch.device(device)
    elem = torch.empty((), dtype=dtype).element_size()
    rows: list[Row] = []
    bar = tqdm(total=2 * len(shapes), desc="salt-bench", unit="run", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for shape in shapes:
        if deadline is not None and time.perf_counter() > deadline:
            rows += [Row(shape, m, mode, skip="not timed: past --deadline") for m in methods for mode in MODES]
            continue
        active = [m for m in methods if not m.skip_reason(shape)]
        rows += [Row(shape, m, mode, skip=m.skip_reason(shape)) for m in methods if m.skip_reason(shape)
                 for mode in MODES]
        sets = {m.name: make_input_sets(m, shape, dtype, device) for m in active}
        picked = auto_choice(device, shape) if any(m.name == AUTO for m in active) else None
        for mode in MODES:
            bar.set_postfix_str(f"{shape.layer} M={shape.M} r={shape.r} {mode}", refresh=True)
            steps = {m.name: make_step(m, sets[m.name], mode) for m in active}
            for m, error in _failing_steps(steps, active):  # reported, not timed
                rows.append(Row(shape, m, mode, skip=f"failed: {error}"))
                del steps[m.name]
            timings = time_steps(steps, device, min_time, back_to_back=is_decode(shape)) if steps else {}
            for m in (m for m in active if m.name in steps):
                row = Row(shape, m, mode, timing=timings[m.name], resolves_to=picked if m.name == AUTO else None)
                if mode == "fwd+bwd":
                    row.peak_bytes = peak_memory_bytes(steps[m.name], device)
                if bandwidth_gbps and m.kind == "salt":
                    row.gbps = min_bytes(shape, mode, elem) / row.seconds / 1e9
                    row.roofline = row.gbps / bandwidth_gbps
                rows.append(row)
            bar.update(1)
        del sets, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_shape is not None:
            on_shape(_ordered(rows, shapes, methods))
    bar.close()
    return _ordered(rows, shapes, methods)


def _ordered(rows: list[Row], shapes, methods) -> list[Row]:
    """The rows by shape, then method, fwd before fwd+bwd, with their ratios."""
    order = {(s, m.name): i for i, (s, m) in enumerate((s, m) for s in shapes for m in methods)}
    rows.sort(key=lambda r: (order[(r.shape, r.method.name)], r.mode != "fwd"))
    add_ratios(rows)
    return rows


def _failing_steps(steps: dict, methods) -> list:
    """Run each step once (a warm-up as well): (method, error) for those whose step
    raises, so that one failing method leaves the others' timings and the report intact."""
    failed = []
    for m in methods:
        try:
            steps[m.name]()
        except Exception as exc:  # reported in the row; the run's exit status is 1
            failed.append((m, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))
    return failed


def _parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"expected one of {sorted(table)}, got {name!r}")
    return table[name]


def _parse_list(arg):
    return [n.strip() for n in arg.split(",") if n.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salt-bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to verify and time on, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None,
                      help="small shape set and short timing (default on CPU; about 30 s on an idle 2-core CPU)")
    size.add_argument("--full", action="store_true", help=f"the model presets: {', '.join(FULL_PRESETS)} (default on CUDA)")
    p.add_argument("--presets", default=None,
                   help=f"comma-separated presets to run instead ({', '.join(PRESETS)}); see --list-presets")
    p.add_argument("--list-presets", action="store_true", help="print the presets' shapes and exit")
    p.add_argument("--dtype", type=_parse_dtype, default=None,
                   help="fp32 | fp16 | bf16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timing per method and measurement (default 0.5 quick, 1.0 otherwise; "
                        "at least 15 interleaved rounds on CPU)")
    p.add_argument("--official-max-gflop", type=float, default=None,
                   help="skip the official baseline where rebuilding its dense weight costs more GFLOP per step "
                        "(default 20 on CPU, no limit on CUDA)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="peak memory bandwidth in GB/s for the roofline columns (default: looked up from the GPU name)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to verify and time, 'auto' included "
                        "(default: auto and every available backend; reference is always timed)")
    p.add_argument("--baselines", default=None,
                   help="comma-separated baselines to time besides the backends: dense, official, or none "
                        "(default: both, none for the auto-vs-reference preset)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (torch.set_num_threads; default: torch's default, or 1 when the "
                        "load average is at least the number of cores)")
    p.add_argument("--verify-only", action="store_true", help="verify the backends and exit")
    p.add_argument("--output", default=None, help="directory for results.csv and the PNG plots")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write every figure (environment, verification, per-round samples) as JSON to FILE")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="start no new shape after SECONDS from the start (the remaining rows say 'not timed'); "
                        "with --output / --json the rows are written after every shape anyway")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _busy_cpu_load() -> tuple[float, int] | None:
    """(load average, cores) when other processes already keep every core busy, else None."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return (load, cores) if load >= cores else None


def _usage_error(msg: str) -> int:
    print(f"salt-bench: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parser().parse_args(argv)
    if args.list_presets:
        for name, shapes in PRESETS.items():
            print(f"{name}:")
            for s in shapes:
                print(f"  {s.layer:22s} M={s.M:<6d} K={s.K:<6d} D={s.D:<6d} r={s.r:<4d} r'={s.rl}")
        return 0
    device = torch.device(args.device)
    busy = _busy_cpu_load() if device.type == "cpu" else None
    if args.threads is not None:
        if args.threads < 1:
            return _usage_error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif busy and torch.get_num_threads() > 1:
        # A team of OpenMP threads waits for its slowest member, and with every core taken
        # one of them is often off-CPU: on a loaded 2-core machine two threads made the
        # quick run several times slower than one.
        torch.set_num_threads(1)
        print(f"note: load average {busy[0]:.1f} on {busy[1]} cores: other processes hold every core, so timing "
              "with 1 thread (--threads N overrides)")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _usage_error("--device cuda but no CUDA device is available")
    quick = (device.type == "cpu") if (args.quick is None and not args.full) else bool(args.quick)
    dtype = args.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.presets:
        names = _parse_list(args.presets)
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            return _usage_error(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}")
    else:
        names = ["quick"] if quick else FULL_PRESETS
    shapes = select_shapes(names)
    if args.baselines is None:
        baselines = preset_baselines(names)
    else:
        baselines = [b for b in _parse_list(args.baselines) if b != "none"]
        unknown = [b for b in baselines if b not in BASELINE_NAMES]
        if unknown:
            return _usage_error(f"--baselines: unknown {unknown}; choose from {list(BASELINES)} or none")
    min_time = args.min_time if args.min_time is not None else (0.5 if quick else 1.0)
    official_cap = args.official_max_gflop
    if official_cap is None and device.type == "cpu":
        official_cap = 20.0

    meta = environment(device, dtype)
    bandwidth = args.bandwidth or (peak_bandwidth_gbps(meta["device_name"]) if device.type == "cuda" else None)
    if device.type == "cuda" and bandwidth is None:
        print(f"note: peak bandwidth of {meta['device_name']!r} unknown; pass --bandwidth GB/s for the roofline columns")
    print(f"salt-bench: {describe(meta)}")

    # 1. verification, in fp32 and in the timing dtype
    backends = available_backends(device)
    time_auto = True
    if args.backends:
        wanted = _parse_list(args.backends)
        for b in wanted:
            if b != AUTO and b not in backends:
                return _usage_error(f"backend {b!r} is not available on {device.type}: "
                                    f"{unavailable_reason(b, device) if b in _BACKEND_MODULES else 'unknown backend'}")
        time_auto = AUTO in wanted
        if not time_auto:  # reference: the baseline
            backends = [b for b in backends if b in wanted or b == REFERENCE]
    vdtypes = list(dict.fromkeys([torch.float32, dtype]))
    results = verify_backends(device, vdtypes, backends)
    verified, ok, verify_errors = [], True, {}
    print("verification against float64 (max relative error over forward, dx, dsigma, dX, dY, dbias):")
    for b in backends:
        good = all(verification_passed(e) for e in results[b].values())
        ok &= good
        verify_errors[b] = max(e[0] for e in results[b].values())
        detail = ", ".join(f"{str(dt).replace('torch.', '')} {e[0]:.1e} (tol {e[1]:.0e}, worst {e[2]})"
                           for dt, e in results[b].items())
        extra = " [Triton interpreter: verified, not timed]" if is_interpreted(b, device) else ""
        print(f"  {b:10s} {'ok    ' if good else 'FAILED'} {detail}{extra}")
        if good:
            verified.append(b)
    if not ok:
        print("salt-bench: a backend FAILED verification; it is not timed.", file=sys.stderr)
    if args.verify_only:
        return 0 if ok else 1

    # 2. timing
    note = load_note(device)
    if note and torch.get_num_threads() > 1:
        print(note)
    if REFERENCE not in verified:
        print("salt-bench: the reference backend failed verification; nothing to compare against.", file=sys.stderr)
        return 1
    if args.backends and time_auto:  # only the explicitly named backends are timed besides auto
        verified = [b for b in verified if b in wanted or b == REFERENCE]
    # auto may pick any available backend: time it only if all of them are verified
    methods = build_methods(device, verified, official_cap, auto=time_auto and ok, baselines=baselines)
    print(f"timing {len(shapes)} shapes x {len(methods)} methods ({', '.join(m.name for m in methods)}), "
          f"{'quick' if quick else 'full'}, {min_time:g} s per measurement"
          + (f"; roofline at {bandwidth:g} GB/s" if bandwidth else ""))
    command = ["salt-bench", *(sys.argv[1:] if argv is None else argv)]
    csv_path = os.path.join(args.output, "results.csv") if args.output else None

    def write_rows(rows, complete=False):
        """results.csv and the JSON file, rewritten after every shape and at the end."""
        if csv_path:
            os.makedirs(args.output, exist_ok=True)
            write_csv(csv_path, rows, meta, verify_errors)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            write_json(args.json, rows, meta, verify_errors, command=command, complete=complete)

    rows = run_benchmarks(shapes, methods, device, dtype, min_time=min_time, bandwidth_gbps=bandwidth,
                          progress=not args.no_progress, on_shape=write_rows,
                          deadline=None if args.deadline is None else started + args.deadline)
    failed = [r for r in rows if r.skip and r.skip.startswith("failed")]
    if failed:
        ok = False
        print(f"salt-bench: {len(failed)} timings failed (their rows say why), e.g. {failed[0].method.name} at "
              f"{failed[0].shape.label} {failed[0].mode}: {failed[0].skip}", file=sys.stderr)
    print()
    print(format_table(rows, markdown=args.markdown, with_roofline=bool(bandwidth)))
    print("\n×ref, ×official: speed-up over the reference chain / the official SALT way (> 1 is faster)"
          + (", median of the per-round paired ratios ± half their interquartile range (the run's noise)"
             if device.type == "cpu" else ", ratio of medians")
          + "; auto (x): the backend auto picked; fwd under no_grad; peak MiB: memory allocated by one fwd+bwd "
          "above its inputs" + ("; % BW: minimum bytes / time as a share of peak bandwidth" if bandwidth else ""))
    summaries = [s for s in (format_back_to_back(rows), auto_summary(rows), policy_summary(rows, device.type)) if s]
    for summary in summaries:
        print(summary)
    if summaries and min_time < 1 and device.type == "cpu":
        print(f"  ({min_time:g} s per measurement is short and noisy on a CPU: ratios within about 0.2 of 1 are "
              "ties; for the policy, run --presets auto-vs-reference --min-time 1 on an idle machine)")
    write_rows(rows, complete=True)
    if args.output:
        title = f"salt-bench on {meta['device_name']}, {meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}"
        pngs = write_plots(args.output, rows, title)
        print(f"wrote {csv_path}, " + ", ".join(pngs))
    if args.json:
        print(f"wrote {args.json}")
    print(f"salt-bench finished in {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1
