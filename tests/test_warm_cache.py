"""The GPU check's launch plan, recorded on CPU, and its Triton cache built off-GPU
(``python -m salt_kernels.tools.aot --warm-cache``): a second build over the same cache,
or over a copy relocated as the check relocates it, compiles nothing."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import salt_kernels
from salt_kernels.tools.gpucheck import Context, plan

pytest.importorskip("triton")
from salt_kernels.backends.triton import kernels as tk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
needs_interpreter = pytest.mark.skipif(not tk.INTERPRET, reason="records on CPU under the Triton interpreter")


def _layer_calls(dtype):
    torch.manual_seed(0)
    layer = salt_kernels.SALTLinear(40, 24, 6, 3, backend="triton", dtype=dtype)
    with torch.no_grad():
        layer.Y.normal_()
    x = torch.randn(5, 40, dtype=dtype, requires_grad=True)
    y = layer(x)
    return layer, x, y, torch.autograd.grad(y, [x, layer.sigma, layer.X, layer.Y], torch.randn_like(y))


@needs_interpreter
def test_recording_plans_as_on_a_gpu_and_computes_with_torch(tmp_path):
    """Recorded launches carry the GPU's flags (tf32x3, no bf16 upcast), and the layer's
    results while recording are the torch path's."""
    path = tmp_path / "plan.jsonl"
    with plan.recording(path, "test", autotune=True):
        _, _, y, grads = _layer_calls(torch.bfloat16)
    records = plan.read_plan(path)
    names = {r["name"] for r in records}
    assert {"shrink", "expand"} <= names and all(r["source"] == "test" for r in records)
    for r in records:
        if "PRECISION" in r["kwargs"]:
            assert r["kwargs"]["PRECISION"] == tk.FP32_PRECISION and r["kwargs"]["UPCAST_DOT"] is False
        assert r["kernel"].startswith("salt_kernels.backends.triton.") and r["configs"]
    shrink = next(r for r in records if r["name"] == "shrink")
    assert shrink["args"][0] == {"tensor": "bfloat16", "aligned": True}
    assert tk.INTERPRET and tk.forward_launches.__module__ == tk.__name__  # restored afterwards
    _, _, y_ref, grads_ref = _layer_calls(torch.bfloat16)  # interpreted kernels, no recording
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=5e-2, atol=5e-2)


@needs_interpreter
def test_recorded_steps_cover_every_step_with_kernels(tmp_path):
    """The numerics, CUDA-graph, compile and bench steps' launches at their GPU sizes."""
    path = tmp_path / "plan.jsonl"
    plan._record_steps(path)
    sources = {r["source"] for r in plan.read_plan(path)}
    assert sources == {"numerics", "cudagraph", "compile", "bench"}
    bench = [r for r in plan.read_plan(path) if r["source"] == "bench"]
    assert any(len(r["configs"]) > 1 for r in bench)  # the benchmark autotunes: every candidate
    assert all(len(r["configs"]) == 1 for r in plan.read_plan(path) if r["source"] in ("numerics", "compile"))


def _warm(cache, *extra):
    proc = subprocess.run([sys.executable, "-m", "salt_kernels.tools.aot", "--warm-cache", str(cache), "--jobs", "2",
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(cache) / plan.MANIFEST).read_text())["summary"]


@needs_interpreter
def test_warm_cache_second_run_and_relocated_copy_compile_nothing(tmp_path):
    """Every planned kernel compiles into the cache; a second build, and a build over a
    copy that the check has relocated (another path: Triton keeps absolute paths), find
    every kernel there and compile none."""
    recorded = tmp_path / "recorded.jsonl"
    with plan.recording(recorded, "tests", autotune=False):
        _layer_calls(torch.float32)
    cache = tmp_path / "cache"
    first = _warm(cache, "--plan", str(recorded))
    assert first["kernels"] >= 3 and first["failed"] == 0 and first["compiled"] == first["kernels"]
    assert not list(cache.glob("*/*.source"))  # pruned: a cache hit needs only the binary and metadata
    again = _warm(cache)  # the plan was kept in the cache (plan.jsonl)
    assert again["compiled"] == 0 and again["cache_hits"] == first["kernels"] and again["new_kernel_files"] == 0
    # as the check receives it: a .tar.xz, unpacked and relocated into its output directory
    with tarfile.open(tmp_path / "cache.tar.xz", "w:xz") as tar:
        tar.add(cache, arcname="triton-cache")
    shutil.rmtree(cache)
    ctx = Context(tmp_path / "out", dry_run=False)
    info = plan.prepare_triton_cache(ctx, tmp_path / "cache.tar.xz")
    run_dir = Path(info["dir"])
    assert info["relocated_groups"] == first["kernels"] and ctx.extra_env["TRITON_CACHE_DIR"] == str(run_dir)
    assert info["usable"] is True and "this Triton matches" in info["summary"]  # built by this very Triton
    assert ctx.extra_env["SALT_KERNELS_PLAN"] == str(run_dir / plan.PLAN_FILE)
    relocated = _warm(run_dir)
    assert relocated["compiled"] == 0 and relocated["new_kernel_files"] == 0
    assert plan.cache_counts(info, info["at_start"]) == dict(compiled=0, launchers_built=0)


def test_cache_of_another_triton_is_reported_unusable(tmp_path):
    """A warm cache built by another Triton build is copied but reported as missing every
    kernel (the tests step then precompiles its plan)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / plan.MANIFEST).write_text(json.dumps(dict(archs=[90], identity=dict(
        kernel_sources=plan.kernel_sources_sha(), triton="0.0.0", triton_key="x", ptxas="y", env_vars={},
        ext_suffix=".so"))))
    ctx = Context(tmp_path / "out", dry_run=False)
    info = plan.prepare_triton_cache(ctx, cache)
    assert info["usable"] is False and "NOT this Triton build" in info["summary"]
    assert "SALT_KERNELS_CACHE_USABLE" not in ctx.extra_env
    missing = plan.prepare_triton_cache(Context(tmp_path / "out2", dry_run=False), tmp_path / "nope")
    assert missing["usable"] is False and "does not exist" in missing["summary"]
