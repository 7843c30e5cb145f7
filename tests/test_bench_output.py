"""salt-bench's output as it runs: rows written after every shape (a run killed mid-way
keeps what it timed), ``--deadline``, and the Triton kernels it ran in its JSON."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from salt_kernels.tools import bench
from salt_kernels.tools.bench import report
from subprocess_testing import kill_when

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--presets", "smoke", "--threads", "1", "--no-progress"]


def test_killed_run_keeps_the_shapes_it_timed(tmp_path):
    out, js = tmp_path / "out", tmp_path / "out" / "results.json"
    cmd = [sys.executable, "-m", "salt_kernels.tools.bench", *SMOKE, "--min-time", "0.3", "--output", str(out),
           "--json", str(js)]
    kill_when(cmd, lambda: js.exists() and any(r["time_ms"] for r in json.loads(js.read_text())["rows"]), ROOT)
    data = json.loads(js.read_text())
    assert data["complete"] is False
    timed = {(r["layer"], r["M"]) for r in data["rows"] if r["time_ms"]}
    assert timed == {("tiny", 64)}  # the first shape, both modes, every method
    assert {r["mode"] for r in data["rows"]} == {"fwd", "fwd+bwd"}
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(data["rows"])


def test_deadline_leaves_the_rest_untimed(tmp_path, capsys):
    js = tmp_path / "r.json"
    assert bench.main([*SMOKE, "--min-time", "0.001", "--deadline", "0", "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert data["complete"] is True and data["rows"]
    assert all(r["time_ms"] is None and r["note"] == "not timed: past --deadline" for r in data["rows"])
    assert "triton_kernels" in data


def test_triton_kernel_report_pairs_winners_with_their_registers(monkeypatch):
    """Each autotuned launch's winning config, with the registers and spills of the
    compiled kernel that matches it (same function, config, warps, stages, key)."""
    pytest.importorskip("triton")
    import triton

    from salt_kernels.backends.triton import kernels as tk

    def compiled(BN, warps, stages, regs, spills):
        meta = SimpleNamespace(num_warps=warps, num_stages=stages)
        src = SimpleNamespace(constants={(0,): BN, (1,): 64})
        return SimpleNamespace(metadata=meta, src=src, n_regs=regs, n_spills=spills)

    jit = SimpleNamespace(__name__="_fake_kernel", arg_names=["BN", "R_PAD"], device_caches={0: (
        {"a": compiled(64, 8, 3, 128, 0), "b": compiled(128, 8, 3, 200, 8)}, None)})
    tuner = SimpleNamespace(fn=jit, keys=["R_PAD"], cache={(64, "torch.bfloat16"): triton.Config(
        {"BN": 128}, num_warps=8, num_stages=3)})
    monkeypatch.setattr(tk, "_fake_kernel", jit, raising=False)
    monkeypatch.setattr(tk, "_AUTOTUNED", {"fake": tuner})
    got = report.triton_kernel_report()
    (winner,) = got["autotuned"]
    assert winner["kernel"] == "fake" and winner["config"] == dict(BN=128, num_warps=8, num_stages=3)
    assert winner["n_regs"] == 200 and winner["n_spills"] == 8
    assert {(k["constexprs"]["BN"], k["n_regs"]) for k in got["compiled"] if k["kernel"] == "_fake_kernel"} == {
        (64, 128), (128, 200)}
