"""The steps of the GPU check: what each one runs (in its own process) and its time
budget, on one GPU and in a dry run."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

from .process import REPO, TOTAL_BUDGET_S, Context, Step, _echo, _echo_until, _num, _result, _sh


def _budget(name: str, ctx: Context) -> int:
    step = next(s for s in STEPS if s.name == name)
    return step.dry_budget_s if ctx.dry_run else step.budget_s


# What the later steps import (the machine may have no network to install them then).
NEEDED_MODULES = ("pytest", "hypothesis", "safetensors", "matplotlib", "tqdm", "ninja")


def step_environment(ctx: Context) -> dict:
    import torch

    figs = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                platform=platform.platform(), cpu_count=os.cpu_count(), gpu_count=torch.cuda.device_count())
    try:
        import triton
        figs["triton"] = triton.__version__
    except ImportError as exc:
        figs["triton"] = None
        figs["triton_error"] = str(exc)
    rc, out = _sh(["nvcc", "--version"]) if shutil.which("nvcc") else _sh(
        [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), "--version"])
    release = [line for line in out.splitlines() if "release" in line] if rc == 0 else []
    figs["nvcc"] = release[0].strip() if release else None  # "Cuda compilation tools, release 13.0, V13.0.88"
    figs["missing_modules"] = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    figs["ninja"] = shutil.which("ninja", path=ctx.env()["PATH"])
    rc, out = _sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    figs["nvidia_smi"] = out.strip().splitlines() if rc == 0 else None
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(dict(index=i, name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                         memory_GiB=round(p.total_memory / 2 ** 30, 1)))
    figs["gpus"] = gpus
    print(json.dumps(figs, indent=1))
    if ctx.dry_run:
        return _result("pass", f"dry run on CPU: torch {torch.__version__}, triton {figs['triton']}", **figs)
    problems = [w for w, bad in (("no CUDA device", not gpus), ("no Triton", figs["triton"] is None),
                                 ("no nvcc", figs["nvcc"] is None),
                                 (f"missing {figs['missing_modules']}", figs["missing_modules"]),
                                 ("no ninja (the build runs one file at a time)", not figs["ninja"])) if bad]
    if problems:
        return _result("fail", "; ".join(problems), **figs)
    return _result("pass", f"{gpus[0]['name']} (sm_{gpus[0]['capability'].replace('.', '')}) x{len(gpus)}, "
                   f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {figs['triton']}", **figs)


def _extension_kernels(ctx) -> str:
    code = ("import salt_kernels.backends.extension as e; "
            "print('cpu', e.has_kernel('cpu'), 'cuda', e.has_kernel('cuda'))")
    rc, out = _sh([sys.executable, "-c", code], timeout=120, env=ctx.env(), cwd=REPO)
    return out.strip().splitlines()[-1] if rc == 0 and out.strip() else f"import failed: {out[-2000:]}"


def step_build(ctx: Context) -> dict:
    built = sorted(p.name for p in (REPO / "salt_kernels").glob("_C*.so"))
    if ctx.dry_run and built:
        kernels = _extension_kernels(ctx)
        return _result("pass", f"dry run: {built[0]} present, not rebuilt ({kernels})", rebuilt=False,
                       kernels=kernels)
    if not (REPO / "setup.py").exists():
        return _result("fail", f"no setup.py next to the package ({REPO}): run from a source checkout")
    import torch

    env = ctx.env()
    if not ctx.dry_run:
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # the local GPU only: a fraction of the build time
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    started = time.perf_counter()
    rc = _echo([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=REPO, env=env)
    secs = time.perf_counter() - started
    kernels = _extension_kernels(ctx)
    print(kernels)
    figs = dict(rebuilt=True, build_s=round(secs, 1), arch=env.get("TORCH_CUDA_ARCH_LIST"), kernels=kernels)
    want = "cuda True" if not ctx.dry_run else "cpu True"
    if rc != 0 or want not in kernels:
        return _result("fail", f"build rc={rc}; kernels: {kernels}", **figs)
    return _result("pass", f"built in {secs:.0f} s for {figs['arch'] or 'CPU'}: {kernels}", **figs)


# The GPU test suite: test_triton.py and test_salt_linear.py run on CUDA whenever it is
# present (DEVICE at module level); the others parametrize over devices (ids with
# "cuda") or carry the gpu marker. The ahead-of-time compile test needs no GPU (CI runs
# it) and takes minutes, and so do the build tests: both are left out here.
# Numerics first (a run stopped at the budget loses the slow compile tests, not these);
# a file that fails to import does not take the others with it.
GPU_TEST_ARGS = ["tests/test_triton.py", "tests/test_extension.py", "tests/test_salt_linear.py",
                 "tests/test_model.py", "tests/test_conformance.py", "tests/test_compile.py", "tests/test_warmup.py",
                 "-k", "(test_triton.py or test_salt_linear.py or cuda or gpu) and not aot and not build",
                 "--continue-on-collection-errors", "--durations=30"]
# Dry run: a few of the same tests under the interpreter.
DRY_TEST_ARGS = ["tests/test_triton.py::test_single_row_decode",
                 "tests/test_compile.py::test_one_graph_for_every_token_count",
                 "-k", "triton-cpu-dynamic or test_single_row_decode"]


def step_tests(ctx: Context) -> dict:
    import xml.etree.ElementTree as ET

    junit = ctx.step_dir("tests") / "junit.xml"
    env = ctx.env()
    if not ctx.dry_run:
        env["SALT_KERNELS_AUTOTUNE"] = "0"  # one config per launch: compile time; bench autotunes
    args = DRY_TEST_ARGS if ctx.dry_run else GPU_TEST_ARGS
    # Stopped 25 s before the step's budget, pytest still writes its report: the tests that
    # ran are counted, not lost with a killed step.
    started = time.perf_counter()
    rc, stopped = _echo_until([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                               *args], _budget("tests", ctx) - 25, cwd=REPO, env=env)
    if not junit.exists():
        return _result("fail", f"pytest rc={rc}, no report" + (" (stopped at the budget)" if stopped else ""),
                       stopped=stopped)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    figs = dict(passed=passed, failed=counts["failures"] + counts["errors"], skipped=counts["skipped"],
                failed_tests=failed, pytest_rc=rc, stopped=stopped, pytest_s=round(time.perf_counter() - started, 1))
    ok = rc == 0 and passed > 0 and not stopped
    return _result("pass" if ok else "fail", f"{passed} passed, {figs['failed']} failed, {counts['skipped']} skipped"
                   + (f"; stopped at the budget after {figs['pytest_s']} s" if stopped else ""), **figs)


def _max_rel(a, b) -> float:
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a.float() - b.float()).abs().max().item() / max(scale, 1e-30) if b.numel() else 0.0


def _fwd_bwd(fn, layer, x, grad_out):
    import torch

    x = x.detach().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    y = fn(x)
    return [y.detach(), *torch.autograd.grad(y, [x] + params, grad_out)]


def _sizes(ctx):
    """(K, D, r, r', token counts, dtype) of the compile and CUDA-graph steps."""
    import torch

    if ctx.dry_run:
        return 24, 20, 6, 3, (2, 3, 5, 8, 13, 37), torch.float32
    return 1024, 1536, 64, 8, (7, 64, 300, 1000, 2048, 4097), torch.bfloat16


def _tolerance(dtype) -> float:
    from ..bench import VERIFY_TOLERANCES
    return VERIFY_TOLERANCES[dtype]


def step_compile(ctx: Context) -> dict:
    """torch.compile(dynamic=True, fullgraph=True), forward and backward, six token counts:
    one compile per backend, results as eager's."""
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    from ... import SALTLinear, available_backends

    K, D, r, rl, counts, dtype = _sizes(ctx)
    compiler = "aot_eager" if ctx.dry_run else "inductor"
    tol = _tolerance(dtype)
    figs, bad = {}, []
    for backend in available_backends(ctx.device):
        torch._dynamo.reset()
        torch.manual_seed(0)
        layer = SALTLinear(K, D, r, rl, backend=backend, device=ctx.device, dtype=dtype)
        with torch.no_grad():
            layer.Y.normal_()
        cnt = CompileCounterWithBackend(compiler)
        compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend=cnt)
        err, first, t0 = 0.0, None, time.perf_counter()
        try:
            for M in counts:
                x = torch.randn(M, K, device=ctx.device, dtype=dtype)
                g = torch.randn(M, D, device=ctx.device, dtype=dtype)
                got, want = _fwd_bwd(compiled, layer, x, g), _fwd_bwd(layer, layer, x, g)
                err = max(err, *(_max_rel(a, b) for a, b in zip(got, want)))
                first = cnt.frame_count if first is None else first
            recompiles = cnt.frame_count - first
            figs[backend] = dict(compiler=compiler, recompiles=recompiles, max_rel_err_vs_eager=err,
                                 seconds=round(time.perf_counter() - t0, 1), token_counts=list(counts))
            if recompiles or err > tol:
                bad.append(f"{backend}: {recompiles} recompiles, max rel err {err:.1e} (tol {tol:.0e})")
        except Exception as exc:  # a graph break under fullgraph=True, or a wrong result
            traceback.print_exc()
            figs[backend] = dict(compiler=compiler, error=f"{type(exc).__name__}: {str(exc)[:500]}")
            bad.append(f"{backend}: {type(exc).__name__}")
        print(backend, figs[backend], flush=True)
    figs["triton_spills"] = triton_spills()
    return _result("fail" if bad else "pass", "; ".join(bad) or
                   f"one graph for {len(counts)} token counts on {', '.join(b for b in figs if b != 'triton_spills')}"
                   f" ({compiler})", **figs)


def triton_spills() -> list:
    """Registers and spills of every Triton kernel compiled in this process so far, as
    Triton reports them (None where this Triton version does not)."""
    try:
        from ...backends.triton import kernels as triton_kernels, multi as triton_multi
    except ImportError:
        return []

    def has_cache(obj):
        return hasattr(obj, "device_caches") or isinstance(getattr(obj, "cache", None), dict)

    seen, fns = [], {}
    for module in (triton_kernels, triton_multi):
        for name in dir(module):
            fn = getattr(module, name)
            if not has_cache(fn):
                fn = getattr(fn, "fn", fn)  # an Autotuner wraps the JITFunction (which wraps the Python function)
            if has_cache(fn):
                fns[id(fn)] = fn
    for fn in fns.values():
        kernels = []
        if hasattr(fn, "device_caches"):  # triton >= 3.2: device -> (kernel cache, ...)
            for entry in list(fn.device_caches.values()):
                cache = entry[0] if isinstance(entry, tuple) else entry
                kernels += list(cache.values()) if isinstance(cache, dict) else []
        else:
            for cache in fn.cache.values():
                kernels += list(cache.values())
        for k in kernels:
            seen.append(dict(kernel=getattr(fn, "__name__", "?"), n_regs=getattr(k, "n_regs", None),
                             n_spills=getattr(k, "n_spills", None)))
    return seen


def step_cudagraph(ctx: Context) -> dict:
    """Warm up, then capture forward and forward+backward in CUDA graphs at several token
    counts and replay them against eager."""
    import torch

    import salt_kernels
    from ... import SALTLinear

    K, D, r, rl, counts, dtype = _sizes(ctx)
    counts = counts[:4]
    torch.manual_seed(0)
    layer = SALTLinear(K, D, r, rl, device=ctx.device, dtype=dtype)
    with torch.no_grad():
        layer.Y.normal_()
    figs = dict(backend=salt_kernels.ops.resolve_backend("auto", ctx.device, r), token_counts=list(counts))
    warmup = getattr(salt_kernels, "warmup", None)
    t0 = time.perf_counter()
    if warmup is not None:
        warmup(layer, counts, dtype=dtype, backward=True)
        figs["warmup"] = "salt_kernels.warmup"
    else:  # the package has no warm-up entry point: run every shape once eagerly instead
        for M in counts:
            x = torch.randn(M, K, device=ctx.device, dtype=dtype, requires_grad=True)
            layer(x).sum().backward()
        figs["warmup"] = "eager fwd+bwd per token count (salt_kernels.warmup absent)"
    figs["warmup_s"] = round(time.perf_counter() - t0, 2)
    if ctx.dry_run:
        return _result("skip", f"dry run: warm-up via {figs['warmup']} ran on CPU; capture needs CUDA", **figs)
    tol, errs = _tolerance(dtype), {}
    for M in counts:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        g = torch.randn(M, D, device="cuda", dtype=dtype)
        with torch.no_grad():  # forward alone: torch.cuda.graph
            static_x = x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = layer(static_x)
            graph.replay()
            fwd_err = _max_rel(static_y, layer(x))
        # forward + backward: make_graphed_callables
        # (make_graphed_callables replaces a module's forward in place: graph a copy)
        graphed = torch.cuda.make_graphed_callables(copy.deepcopy(layer), (x.detach().requires_grad_(True),))
        got, want = _fwd_bwd(graphed, graphed, x, g), _fwd_bwd(layer, layer, x, g)
        errs[M] = dict(forward=fwd_err, fwd_bwd=max(_max_rel(a, b) for a, b in zip(got, want)))
        print(M, errs[M], flush=True)
    figs["max_rel_err_vs_eager"] = errs
    figs["triton_spills"] = triton_spills()
    worst = max(max(e.values()) for e in errs.values())
    status = "pass" if worst <= tol else "fail"
    return _result(status, f"captured and replayed fwd and fwd+bwd at M={list(counts)}; max rel err {worst:.1e}",
                   **figs)


def step_multigpu(ctx: Context) -> dict:
    """x on cuda:1 while cuda:0 is current: every backend computes on x's device and
    matches the result with cuda:1 current."""
    import torch

    from ... import SALTLinear, available_backends

    n = torch.cuda.device_count() if not ctx.dry_run else 0
    if n < 2:
        return _result("skip", f"needs >= 2 GPUs, found {n}", gpus=n)
    K, D, r, rl, counts, dtype = _sizes(ctx)
    figs, bad = {}, []
    for backend in available_backends("cuda:1"):
        torch.manual_seed(0)
        layer = SALTLinear(K, D, r, rl, backend=backend, device="cuda:1", dtype=dtype)
        x = torch.randn(counts[2], K, device="cuda:1", dtype=dtype)
        g = torch.randn(counts[2], D, device="cuda:1", dtype=dtype)
        torch.cuda.set_device(0)
        before = torch.cuda.memory_allocated(0)
        try:
            foreign = _fwd_bwd(layer, layer, x, g)
            torch.cuda.synchronize(1)
            with torch.cuda.device(1):
                home = _fwd_bwd(layer, layer, x, g)
            err = max(_max_rel(a, b) for a, b in zip(foreign, home))
            on_0 = torch.cuda.memory_allocated(0) - before
            figs[backend] = dict(max_rel_err=err, bytes_on_cuda0=on_0)
            if err > _tolerance(dtype) or on_0 > 0 or any(t.device != x.device for t in foreign):
                bad.append(f"{backend}: err {err:.1e}, {on_0} B on cuda:0")
        except Exception as exc:
            traceback.print_exc()
            bad.append(f"{backend}: {type(exc).__name__}: {exc}")
    return _result("fail" if bad else "pass", "; ".join(bad) or f"device guard holds on {', '.join(figs)}", **figs)


def _bench_argv(ctx: Context, out: Path) -> list:
    argv = [sys.executable, "-m", "salt_kernels.tools.bench", "--output", str(out), "--no-progress"]
    if ctx.dry_run:
        argv += ["--device", "cpu", "--presets", "smoke", "--dtype", "fp32", "--min-time", "0.02"]
    else:
        argv += ["--device", "cuda", "--presets", "tokens,decode,llama7b", "--dtype", "bf16", "--min-time", "0.2"]
    return argv


def _bench_rows(out: Path) -> list[dict]:
    """Rows of the benchmark's results: its --json file when it wrote one, else results.csv."""
    js = out / "results.json"
    if js.exists():
        data = json.loads(js.read_text())
        return data.get("rows", data) if isinstance(data, dict) else data
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def step_bench(ctx: Context) -> dict:
    out = ctx.out / "bench"
    argv = _bench_argv(ctx, out)
    rc, help_text = _sh([sys.executable, "-m", "salt_kernels.tools.bench", "--help"], env=ctx.env(), cwd=REPO)
    if "--json" in help_text:
        argv += ["--json", str(out / "results.json")]
    rc = _echo(argv, cwd=REPO, env=ctx.env())
    try:
        rows = _bench_rows(out)
    except OSError as exc:
        return _result("fail", f"salt-bench rc={rc}, no results: {exc}")
    keep = ("backend", "kind", "preset", "layer", "M", "K", "D", "r", "r_lora", "mode", "time_ms",
            "speedup_vs_reference", "roofline_fraction", "achieved_GBps", "peak_mem_MiB", "note")
    rows = [{k: r.get(k) for k in keep} for r in rows]
    summary = {}
    for r in rows:
        s = summary.setdefault(f"{r['backend']} {r['mode']}", dict(speedups=[], roofline=[]))
        if _num(r["speedup_vs_reference"]):
            s["speedups"].append(_num(r["speedup_vs_reference"]))
        if _num(r["roofline_fraction"]) is not None:
            s["roofline"].append(_num(r["roofline_fraction"]))
    for s in summary.values():
        sp, rf = s.pop("speedups"), s.pop("roofline")
        s["geomean_speedup_vs_reference"] = math.exp(sum(map(math.log, sp)) / len(sp)) if sp else None
        s["min_speedup_vs_reference"] = min(sp) if sp else None
        s["max_pct_hbm_roofline"] = 100 * max(rf) if rf else None
    plots = sorted(str(p.relative_to(ctx.out)) for p in out.glob("*.png"))
    status = "pass" if rc == 0 and rows else "fail"
    # what AUTO_POLICY["cuda"] should say, from these timings (it holds a default until measured)
    from ...ops import AUTO_POLICY
    from ..bench.report import measured_policy

    policy = measured_policy(rows)
    return _result(status, f"salt-bench rc={rc}, {len(rows)} rows", argv=argv[1:], rows=rows, by_method=summary,
                   plots=plots, measured_auto_policy=policy, auto_policy=AUTO_POLICY.get(ctx.device.split(":")[0]))


# Budgets on one GPU are estimates until the check has run on one (the report's wall
# times and the tests step's --durations calibrate them). Autotuning is off where it only
# costs time (tests, compile); the bench step autotunes.
STEPS = [
    Step("environment", "Environment (GPU, driver, torch/triton/CUDA, modules)", 20, 30, step_environment),
    Step("build", "Extension build (local arch only)", 120, 60, step_build),
    Step("tests", "GPU test suite, compiled kernels", 220, 120, step_tests),
    Step("compile", "torch.compile(dynamic=True, fullgraph=True)", 60, 90, step_compile,
         env={"SALT_KERNELS_AUTOTUNE": "0"}),
    Step("cudagraph", "CUDA-graph capture after warm-up", 25, 60, step_cudagraph),
    Step("multigpu", "Device guard with 2+ GPUs", 15, 30, step_multigpu),
    Step("bench", "salt-bench GPU presets (tokens, decode, llama7b; bf16)", 100, 120, step_bench),
]
assert sum(s.budget_s for s in STEPS) <= TOTAL_BUDGET_S
