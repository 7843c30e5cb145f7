"""The one way salt_kernels reports timings: rows with ratios to the baselines, printed
as an aligned text or Markdown table (:func:`format_columns`), written as CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass

from .methods import AUTO, DENSE, OFFICIAL, REFERENCE, Method
from .presets import Shape
from .timing import Ratio, Timing, paired_ratio

MODES = ("fwd", "fwd+bwd")


@dataclass
class Row:
    """One method at one shape in one mode."""

    shape: Shape
    method: Method
    mode: str
    timing: Timing | None = None
    peak_bytes: int | None = None
    skip: str | None = None
    vs_reference: Ratio | None = None
    vs_official: Ratio | None = None
    vs_dense: Ratio | None = None
    gbps: float | None = None
    roofline: float | None = None
    resolves_to: str | None = None  # for "auto": the backend it picked, where known

    @property
    def seconds(self) -> float | None:
        """Median seconds per call (None if skipped)."""
        return self.timing.median if self.timing else None


def add_ratios(rows: list[Row]) -> None:
    """Speed-ups over the reference chain, the official SALT way and the dense layer:
    baseline time / this method's time (> 1 is faster), measured pairwise
    (:func:`timing.paired_ratio`)."""
    by_key = {(r.shape, r.mode, r.method.name): r for r in rows if r.timing}
    for r in rows:
        if not r.timing:
            continue
        for attr, base in (("vs_reference", REFERENCE), ("vs_official", OFFICIAL), ("vs_dense", DENSE)):
            b = by_key.get((r.shape, r.mode, base))
            if b is not None:
                setattr(r, attr, paired_ratio(b.timing, r.timing))


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def fmt_ratio(r: Ratio | None, spec=".2f") -> str:
    """``1.23`` or ``1.23±0.04`` (± half the interquartile range of the paired ratios)."""
    if r is None:
        return ""
    s = format(r.median, spec)
    return s if r.spread is None else f"{s}±{r.spread:{spec}}"


def format_columns(head: list[str], lines: list[list[str]], *, markdown: bool = False,
                   left: int = 2, group: bool = True, notes: dict | None = None) -> str:
    """An aligned text table (the first ``left`` columns left-aligned; with ``group``,
    a blank line where the first column changes and repeats of it blanked) or a
    Markdown table.
    ``notes``: line index -> text shown after the ``left`` columns in place of the
    numbers (e.g. why an entry was skipped)."""
    notes = notes or {}
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, cells in enumerate(lines):
            row = cells[:left] + [notes[i]] + [""] * (len(head) - left - 1) if i in notes else cells
            out.append("| " + " | ".join(row) + " |")
        return "\n".join(out)
    timed = [c for i, c in enumerate(lines) if i not in notes]
    widths = [max([len(head[j])] + [len(c[j]) for c in (timed if j >= left else lines)]) for j in range(len(head))]

    def join(cells):
        return "  ".join(c.ljust(widths[j]) if j < left else c.rjust(widths[j]) for j, c in enumerate(cells))
    header = join(head)
    out, prev = [header, "-" * len(header)], None
    for i, cells in enumerate(lines):
        if group and prev is not None and cells[0] != prev:
            out.append("")
        shown = cells if not group or cells[0] != prev else [""] + cells[1:]
        prev = cells[0]
        if i in notes:
            out.append("  ".join([shown[j].ljust(widths[j]) for j in range(left)] + [notes[i]]))
        else:
            out.append(join(shown))
    return "\n".join(out)


def format_table(rows: list[Row], *, markdown: bool = False, with_roofline: bool = False) -> str:
    """One line per (shape, method): fwd and fwd+bwd times with their speed-ups."""
    head = ["shape", "method", "fwd ms", "×ref", "×official", "fwd+bwd ms", "×ref", "×official", "peak MiB"]
    if with_roofline:
        head += ["fwd % BW", "fwd+bwd % BW"]
    pairs: dict = {}
    for r in rows:
        pairs.setdefault((r.shape, r.method.name), {})[r.mode] = r
    lines, notes = [], {}
    for (shape, name), modes in pairs.items():
        f, b = modes.get("fwd"), modes.get("fwd+bwd")
        label = name if not f.resolves_to else f"{name} ({f.resolves_to})"
        if f.skip:
            notes[len(lines)] = f.skip
            lines.append([shape.label, label] + [""] * (len(head) - 2))
            continue
        cells = [shape.label, label,
                 _fmt(f.seconds * 1e3, ".3f"), fmt_ratio(f.vs_reference), fmt_ratio(f.vs_official, ".1f"),
                 _fmt(b.seconds * 1e3, ".3f"), fmt_ratio(b.vs_reference), fmt_ratio(b.vs_official, ".1f"),
                 _fmt(b.peak_bytes and b.peak_bytes / 2 ** 20, ".1f")]
        if with_roofline:
            cells += [_fmt(f.roofline and 100 * f.roofline, ".0f"), _fmt(b.roofline and 100 * b.roofline, ".0f")]
        lines.append(cells)
    return format_columns(head, lines, markdown=markdown, notes=notes)


def auto_summary(rows: list[Row], target: float = 0.95) -> str | None:
    """The slowest ``auto`` / ``reference`` ratio per mode over all shapes, against
    ``target``; None when ``auto`` was not timed."""
    lines = []
    for mode in MODES:
        ratios = [(r.vs_reference, r.shape) for r in rows if r.method.name == AUTO and r.mode == mode
                  and r.vs_reference is not None]
        if not ratios:
            return None
        worst, shape = min(ratios, key=lambda p: p[0].median)
        held = sum(r.median >= target for r, _ in ratios)
        lines.append(f"  {mode:8s} worst {fmt_ratio(worst)}x at {shape.label}; "
                     f">= {target:g}x at {held} of {len(ratios)} shapes")
    return "auto vs reference (median of paired ratios ± half their IQR):\n" + "\n".join(lines)


def measured_policy(records: list[dict]) -> tuple:
    """The ``dispatch.AUTO_POLICY`` rows that these measurements support, in its format:
    ``((largest M, backends in order of preference), ..., (None, backends))``.

    records: one dict per row (``row_record``, or the rows of results.csv / results.json),
    read for backend, kind, M, mode and speedup_vs_reference. At each measured token count
    M, a backend goes ahead of ``reference`` only where the geometric mean of its speed-up
    over ``reference``, over every shape and both modes timed at that M, is at least 1
    (ahead of each other by that mean). Consecutive token counts with the same order make
    one row; the last row covers any larger M. Empty when no SALT backend besides
    ``reference`` was timed.
    """
    logs: dict[int, dict[str, list[float]]] = {}
    for rec in records:
        name, speedup = rec.get("backend"), rec.get("speedup_vs_reference")
        if rec.get("kind") != "salt" or name in (AUTO, REFERENCE) or speedup in (None, ""):
            continue
        logs.setdefault(int(rec["M"]), {}).setdefault(name, []).append(math.log(float(speedup)))
    rows: list[tuple] = []
    for M in sorted(logs):
        means = {name: sum(v) / len(v) for name, v in logs[M].items()}
        ahead = sorted((n for n, m in means.items() if m >= 0), key=lambda n: -means[n])
        order = (*ahead, REFERENCE)
        if rows and rows[-1][1] == order:
            rows[-1] = (M, order)
        else:
            rows.append((M, order))
    return tuple(rows[:-1]) + ((None, rows[-1][1]),) if rows else ()


def policy_in_words(policy: tuple) -> str:
    """An ``AUTO_POLICY`` row tuple in words, naming each row's first choice:
    "reference up to 16 rows and cpu above"."""
    parts = [f"{order[0]} up to {bound} rows" if bound is not None else
             f"{order[0]} above" if i else f"{order[0]} at every row count"
             for i, (bound, order) in enumerate(policy)]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def policy_summary(rows: list[Row], device_type: str) -> str | None:
    """The auto policy these timings support, in words, next to the one ``auto`` uses
    now; None when no SALT backend besides ``reference`` was timed."""
    from ...ops.dispatch import AUTO_POLICY

    policy = measured_policy([row_record(r, {}, {}) for r in rows])
    if not policy:
        return None
    measured = sorted({r.shape.M for r in rows if r.method.kind == "salt" and r.timing})
    span = f"{measured[0]} rows" if len(measured) == 1 else f"{measured[0]} to {measured[-1]} rows"
    current = AUTO_POLICY.get(device_type, ((None, ("reference",)),))
    now = ("  auto does the same at these row counts." if all(_order_at(current, M) == _order_at(policy, M)
                                                           for M in measured) else
           f"  auto uses {policy_in_words(current)} (AUTO_POLICY in salt_kernels/ops/dispatch.py).")
    return (f"auto policy: on this machine, auto should use {policy_in_words(policy)} (timed at {span}; a "
            "backend goes first where its speed-up over reference, the geometric mean over the shapes and modes "
            f"timed at that row count, is at least 1).\n{now}")


def _order_at(policy: tuple, M: int) -> tuple:
    """The backends a policy row tuple gives M rows."""
    return next(order for bound, order in policy if bound is None or M <= bound)


CSV_FIELDS = ["device", "device_name", "dtype", "threads", "torch", "triton", "salt_kernels", "backend", "kind",
              "resolves_to", "preset", "layer", "M", "K", "D", "r", "r_lora", "mode", "time_ms", "time_min_ms",
              "rounds", "time_back_to_back_ms", "time_cuda_graph_ms", "speedup_vs_reference", "speedup_vs_reference_p25", "speedup_vs_reference_p75",
              "speedup_vs_official", "speedup_vs_dense", "peak_mem_MiB", "achieved_GBps", "roofline_fraction",
              "verify_max_rel_err", "note"]


def row_record(r: Row, meta: dict, verify_errors: dict) -> dict:
    """Every figure of one row, as plain values (None where not measured)."""
    s, t = r.shape, r.timing

    def ratio(x):
        return None if x is None else x.median
    return dict(
        meta, backend=r.method.name, kind=r.method.kind, resolves_to=r.resolves_to, preset=s.preset,
        layer=s.layer, M=s.M, K=s.K, D=s.D, r=s.r, r_lora=s.rl, mode=r.mode,
        time_ms=t and t.median * 1e3, time_min_ms=t and t.min * 1e3, rounds=t and t.rounds,
        time_back_to_back_ms=t and t.back_to_back and t.back_to_back * 1e3,
        time_cuda_graph_ms=t and t.graph and t.graph * 1e3,
        speedup_vs_reference=ratio(r.vs_reference),
        speedup_vs_reference_p25=r.vs_reference and r.vs_reference.low,
        speedup_vs_reference_p75=r.vs_reference and r.vs_reference.high,
        speedup_vs_official=ratio(r.vs_official), speedup_vs_dense=ratio(r.vs_dense),
        peak_mem_MiB=r.peak_bytes and r.peak_bytes / 2 ** 20, achieved_GBps=r.gbps, roofline_fraction=r.roofline,
        verify_max_rel_err=verify_errors.get(r.method.name), note=r.skip or r.method.note)


_CSV_SPECS = {"time_ms": ".4f", "time_min_ms": ".4f", "time_back_to_back_ms": ".4f", "time_cuda_graph_ms": ".4f", "speedup_vs_reference": ".3f",
              "speedup_vs_reference_p25": ".3f", "speedup_vs_reference_p75": ".3f", "speedup_vs_official": ".3f",
              "speedup_vs_dense": ".3f", "peak_mem_MiB": ".4f", "achieved_GBps": ".1f",
              "roofline_fraction": ".3f", "verify_max_rel_err": ".2e"}


def write_csv(path, rows: list[Row], meta: dict, verify_errors: dict) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
        rec = row_record(r, meta, verify_errors)
        w.writerow({k: _fmt(v, _CSV_SPECS[k]) if k in _CSV_SPECS else ("" if v is None else v)
                    for k, v in rec.items()})
    _replace(path, buf.getvalue())


def write_json(path, rows: list[Row], meta: dict, verify_errors: dict, *, command: list[str] | None = None,
               complete: bool = True) -> None:
    """Every figure of the run: the environment, the command, the verification errors,
    one record per row with the raw per-round samples (seconds), and the Triton kernels
    that ran (:func:`triton_kernel_report`). ``complete`` is False while the run goes on
    (the file is rewritten after every shape)."""
    records = []
    for r in rows:
        rec = {k: v for k, v in row_record(r, meta, verify_errors).items() if k not in meta}
        rec["samples_s"] = r.timing.samples if r.timing else None
        records.append(rec)
    _replace(path, json.dumps(dict(environment=meta, command=command, complete=complete,
                                   verify_max_rel_err=verify_errors, rows=records,
                                   triton_kernels=triton_kernel_report()), indent=1, default=str))


def _replace(path, text: str) -> None:
    """Write through a temporary file and a rename: a run killed mid-write keeps the last
    complete file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _triton_functions() -> dict:
    """The Triton JIT functions and autotuners of salt_kernels' Triton backend, by name
    (empty without Triton)."""
    try:
        from ...backends.triton import kernels as tk, multi as tm
    except ImportError:
        return {}
    found = {}
    for module in (tk, tm):
        for name in dir(module):
            obj = getattr(module, name)
            for fn in (obj, getattr(obj, "fn", None)):  # an Autotuner wraps the JITFunction
                if hasattr(fn, "device_caches"):
                    found.setdefault(id(fn), fn)
    return found


def compiled_triton_kernels() -> list:
    """Every Triton kernel of salt_kernels compiled (or loaded from the cache) in this
    process so far: its constexprs, warps, stages, and registers and spills as Triton
    reports them once loaded on the GPU (None before, and on Tritons that do not)."""
    seen = []
    for fn in _triton_functions().values():
        kernels = []
        for entry in list(fn.device_caches.values()):  # device -> (kernel cache, ...)
            cache = entry[0] if isinstance(entry, tuple) else entry
            kernels += list(cache.values()) if isinstance(cache, dict) else []
        names = getattr(fn, "arg_names", None) or []
        for k in kernels:
            meta = getattr(k, "metadata", None)
            consts = getattr(getattr(k, "src", None), "constants", None) or {}
            constexprs = {names[key[0]] if isinstance(key, tuple) and len(key) == 1 and key[0] < len(names)
                          else str(key): v for key, v in consts.items()
                          if isinstance(v, (bool, int, float, str))}
            seen.append(dict(kernel=getattr(fn, "__name__", "?"), n_regs=getattr(k, "n_regs", None),
                             n_spills=getattr(k, "n_spills", None), num_warps=getattr(meta, "num_warps", None),
                             num_stages=getattr(meta, "num_stages", None), constexprs=constexprs))
    return seen


def triton_kernel_report() -> dict:
    """What the Triton backend ran in this process: each autotuned launch's winning
    config (kernel, autotune key, config) with the registers and spills of the compiled
    kernels that match it, and every compiled kernel's registers and spills."""
    compiled = compiled_triton_kernels()
    winners = []
    try:
        from ...backends.triton import kernels as tk
    except ImportError:
        return dict(autotuned=[], compiled=compiled)
    for name, tuner in getattr(tk, "_AUTOTUNED", {}).items():
        for key, cfg in dict(getattr(tuner, "cache", {})).items():
            keyed = dict(zip(tuner.keys, key))
            match = [k for k in compiled if k["kernel"] == getattr(tuner.fn, "__name__", None)
                     and k["num_warps"] == cfg.num_warps and k["num_stages"] == cfg.num_stages
                     and all(k["constexprs"].get(n) == v for n, v in {**cfg.kwargs, **keyed}.items()
                             if n in k["constexprs"])]
            regs = [k["n_regs"] for k in match if k["n_regs"] is not None]
            spills = [k["n_spills"] for k in match if k["n_spills"] is not None]
            winners.append(dict(kernel=name, key=[str(v) for v in key], config=dict(
                cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                n_regs=max(regs) if regs else None, n_spills=max(spills) if spills else None))
    return dict(autotuned=winners, compiled=compiled)
