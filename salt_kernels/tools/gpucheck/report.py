"""The GPU check's report: ``report.json`` (every figure) and ``report.md`` (pass/fail
per step, the environment, the benchmark tables and plots, the tails of failed logs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .process import TOTAL_BUDGET_S, Context, _num


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _policy_repr(policy) -> str:
    """An AUTO_POLICY row tuple as Python source, also after a JSON round trip (lists)."""
    return repr(tuple((bound, tuple(order)) for bound, order in policy))


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a check killed
    while writing leaves the previous report, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(ctx: Context, records: list, wall: float, pending: list | None = None, running: bool = False,
                 extra: dict | None = None) -> bool:
    """Write report.json and report.md for the steps run so far (``records``) and those
    still to come (``pending``, step names; the first of them is under way if
    ``running``): called before and after every step, so that a check stopped at any
    point leaves the report of every finished step. ``extra``: run-wide figures (the
    Triton cache). True when no step failed and none is pending."""
    pending = list(pending or [])
    failed = any(r["status"] == "fail" for r in records)
    ok = not failed and not pending
    state = "FAIL" if failed else "PASS" if ok else "INCOMPLETE"
    report = dict(ok=ok, complete=not pending, dry_run=ctx.dry_run, wall_s=round(wall, 1),
                  total_budget_s=TOTAL_BUDGET_S, steps=records, pending=pending,
                  running=pending[0] if running and pending else None, **(extra or {}))
    _write_atomic(ctx.out / "report.json", json.dumps(report, indent=1, default=str))
    kind = "dry run (CPU, Triton interpreter, tiny sizes)" if ctx.dry_run else "GPU"
    md = [f"# salt_kernels GPU check: {state}", "",
          f"{kind}; {wall:.0f} s so far (budget {TOTAL_BUDGET_S} s on one GPU). Every figure is in "
          "`report.json`; each step's output is in `logs/`.", "",
          "| step | result | wall s | budget s | summary |", "|---|---|---|---|---|"]
    for r in records:
        md.append(f"| {r['name']} | {r['status'].upper()} | {r['wall_s']} | {r['budget_s']} | "
                  f"{str(r['summary']).replace('|', '/')} |")
    for i, name in enumerate(pending):
        md.append(f"| {name} | {'RUNNING' if i == 0 and running else 'NOT RUN'} | – | – | – |")
    cache = (extra or {}).get("triton_cache")
    if cache:
        md += ["", "## Triton cache", "", f"- {cache.get('summary', '')}"]
        per_step = cache.get("per_step") or {}
        if per_step:
            md.append("- compiled at run time (cache misses), kernels / launchers: " + ", ".join(
                f"{step} {c.get('compiled', 0)} / {c.get('launchers_built', 0)}" for step, c in per_step.items()))
    env = next((r for r in records if r["name"] == "environment"), None)
    if env and env.get("figures"):
        f = env["figures"]
        md += ["", "## Environment", ""] + [f"- {k}: {_fmt(f.get(k))}" for k in (
            "gpus", "nvidia_smi", "torch", "torch_cuda", "triton", "nvcc", "nvcc_path", "setuptools", "python")]
    bench = next((r for r in records if r["name"] == "bench"), None)
    if bench and bench.get("figures", {}).get("by_method"):
        md += ["", "## Benchmarks (speed-up vs the reference chain, % of HBM roofline)", "",
               "| backend, mode | geomean speed-up | min speed-up | max % roofline |", "|---|---|---|---|"]
        for k, s in bench["figures"]["by_method"].items():
            md.append(f"| {k} | {_fmt(s['geomean_speedup_vs_reference'])} | {_fmt(s['min_speedup_vs_reference'])} "
                      f"| {_fmt(s['max_pct_hbm_roofline'])} |")
        md += ["", "| backend | preset | layer | M | r | mode | ms | × ref | % roofline |",
               "|---|---|---|---|---|---|---|---|---|"]
        for row in bench["figures"]["rows"]:
            rf = _num(row.get("roofline_fraction"))
            md.append(f"| {row['backend']} | {row['preset']} | {row['layer']} | {row['M']} | {row['r']} | "
                      f"{row['mode']} | {row['time_ms'] or '–'} | {row['speedup_vs_reference'] or '–'} | "
                      f"{_fmt(rf and 100 * rf)} |")
        if bench["figures"].get("measured_auto_policy"):
            md += ["", "The `auto` policy these timings support (`dispatch.AUTO_POLICY` format; a backend goes "
                   "ahead of `reference` at a token count only where its geomean speed-up there is >= 1):", "",
                   f"    {_policy_repr(bench['figures']['measured_auto_policy'])}", "",
                   f"The table in `dispatch.AUTO_POLICY` for this device: "
                   f"`{_policy_repr(bench['figures'].get('auto_policy') or ())}`."]
        md += [""] + [f"![{Path(p).stem}]({p})" for p in bench["figures"].get("plots", [])]
    tuned = (bench or {}).get("figures", {}).get("autotuned") or []
    if tuned:
        md += ["", "## Autotuned configs the benchmark timed", "",
               "| kernel | key | config | registers | spills |", "|---|---|---|---|---|"]
        for t in tuned:
            md.append(f"| {t['kernel']} | {', '.join(map(str, t['key']))} | "
                      f"{', '.join(f'{k}={v}' for k, v in t['config'].items())} | {_fmt(t.get('n_regs'))} | "
                      f"{_fmt(t.get('n_spills'))} |")
    spills = [s for r in records for s in r.get("figures", {}).get("triton_spills", []) or []]
    if spills:
        worst = max((s["n_spills"] or 0) for s in spills)
        md += ["", "## Triton kernels seen at run time", "",
               f"{len(spills)} compiled kernels; most spills: {worst}; most registers: "
               f"{max((s['n_regs'] or 0) for s in spills)}."]
    failed = [r for r in records if r["status"] == "fail"]
    for r in failed:
        md += ["", f"## {r['name']}: FAIL", "", "```", r.get("log_tail", "")[-2000:], "```"]
    _write_atomic(ctx.out / "report.md", "\n".join(md) + "\n")
    return ok
