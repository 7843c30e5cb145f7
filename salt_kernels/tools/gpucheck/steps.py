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
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

from ..bench.report import compiled_triton_kernels as triton_spills
from .process import (PYTEST_STOP_BEFORE_S, REPO, TOTAL_BUDGET_S, Context, Step, _echo, _echo_until, _num, _result,
                      _sh)
from .workload import CUDAGRAPH_COUNTS, NUMERICS_DTYPES, bench_options, gpu_test_args, sizes


def _budget(name: str, ctx: Context) -> int:
    step = next(s for s in STEPS if s.name == name)
    return step.dry_budget_s if ctx.dry_run else step.budget_s


# What the later steps import (the machine may have no network to install them then),
# the build included (setuptools, wheel: pyproject.toml's build requirements).
NEEDED_MODULES = ("pytest", "hypothesis", "safetensors", "matplotlib", "tqdm", "ninja", "setuptools", "wheel")
WHEELS_HINT = ("bash .ci/gpu_check.sh installs them from .whl/ (made by bash .ci/gpu_check.sh --download; "
               "see docs/gpu.md)")


def _version_tuple(text) -> tuple:
    """(major, minor, patch) of a version string such as '77.0.3' or '13.0' (missing parts 0)."""
    nums = re.findall(r"\d+", str(text or ""))[:3]
    return tuple(int(n) for n in nums) + (0,) * (3 - len(nums))


def setuptools_required() -> str:
    """The setuptools version pyproject.toml's build requires (its license field, a
    string, needs setuptools >= 77)."""
    text = (REPO / "pyproject.toml").read_text() if (REPO / "pyproject.toml").exists() else ""
    m = re.search(r'"setuptools\s*>=\s*([\d.]+)"', text)
    return m.group(1) if m else "0"


def check_setuptools(installed: str | None, required: str) -> str | None:
    """A problem (naming the fix) if the build's setuptools is missing or too old."""
    if installed is None:
        return (f"setuptools missing (the build needs >= {required}): pip install 'setuptools>={required}'; "
                f"{WHEELS_HINT}")
    if _version_tuple(installed) < _version_tuple(required):
        return (f"setuptools {installed} < {required}, which pyproject.toml needs (setup.py build_ext would abort "
                f"reading its license field): pip install 'setuptools>={required}'; {WHEELS_HINT}")
    return None


def check_cuda_match(nvcc_release: str | None, torch_cuda: str | None) -> str | None:
    """A problem if the toolkit that builds the extension is another CUDA major version
    than torch's (the CUDA part would fail and the build fall back to CPU only)."""
    if torch_cuda is None:
        return "torch has no CUDA (torch.version.cuda is None): install a CUDA build of torch"
    if nvcc_release is None:
        return ("no nvcc (the CUDA extension cannot be built): put a CUDA toolkit's bin/ on PATH or set CUDA_HOME "
                f"to a CUDA {_version_tuple(torch_cuda)[0]}.x toolkit")
    nv, tc = _version_tuple(re.sub(r".*release\s*", "", nvcc_release)), _version_tuple(torch_cuda)
    if nv[0] != tc[0]:
        return (f"nvcc is CUDA {nv[0]}.{nv[1]} but torch was built with CUDA {torch_cuda}: the CUDA extension would "
                f"not build; set CUDA_HOME to a CUDA {tc[0]}.x toolkit (or install the torch build for CUDA {nv[0]})")
    return None


def check_modules(missing: list) -> str | None:
    if missing:
        return f"missing Python modules {list(missing)}: pip install {' '.join(missing)}; {WHEELS_HINT}"
    return None


def check_ninja(path: str | None) -> str | None:
    if not path:
        return (f"no ninja program on PATH (torch would build the extension one file at a time, past the build "
                f"budget): pip install ninja; {WHEELS_HINT}")
    return None


def build_nvcc() -> str | None:
    """The nvcc setup.py builds with: CUDA_HOME, CUDA_PATH, /usr/local/cuda, then PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def environment_problems(figs: dict, dry_run: bool) -> list[str]:
    """What would make a later step fail, each with its fix; in a dry run only what the
    CPU steps need."""
    checks = [check_modules(figs["missing_modules"]),
              check_setuptools(figs["setuptools"], figs["setuptools_required"]), check_ninja(figs["ninja"])]
    if not dry_run:
        checks = [None if figs["gpus"] else "no CUDA device visible to torch (torch.cuda.device_count() == 0)",
                  None if figs["triton"] else f"no Triton ({figs.get('triton_error')}): pip install triton",
                  check_cuda_match(figs["nvcc"], figs["torch_cuda"])] + checks
    return [c for c in checks if c]


def step_environment(ctx: Context) -> dict:
    from importlib import metadata

    import torch

    figs = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                platform=platform.platform(), cpu_count=os.cpu_count(), gpu_count=torch.cuda.device_count())
    try:
        import triton
        figs["triton"] = triton.__version__
    except ImportError as exc:
        figs["triton"] = None
        figs["triton_error"] = str(exc)
    nvcc = build_nvcc()
    rc, out = _sh([nvcc, "--version"]) if nvcc else (127, "")
    release = [line for line in out.splitlines() if "release" in line] if rc == 0 else []
    figs["nvcc_path"] = nvcc
    figs["nvcc"] = release[0].strip() if release else None  # "Cuda compilation tools, release 13.0, V13.0.88"
    figs["missing_modules"] = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    try:
        figs["setuptools"] = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        figs["setuptools"] = None
    figs["setuptools_required"] = setuptools_required()
    figs["ninja"] = shutil.which("ninja", path=ctx.env()["PATH"])
    gpus = []
    if not ctx.dry_run:
        rc, out = _sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        figs["nvidia_smi"] = out.strip().splitlines() if rc == 0 else None
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(dict(index=i, name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                             memory_GiB=round(p.total_memory / 2 ** 30, 1)))
    figs["gpus"] = gpus
    print(json.dumps(figs, indent=1))
    problems = environment_problems(figs, ctx.dry_run)
    if problems:
        return _result("fail", "; ".join(problems), problems=problems, **figs)
    if ctx.dry_run:
        return _result("pass", f"dry run on CPU: torch {torch.__version__}, triton {figs['triton']}", **figs)
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


# Dry run: a few of the same tests under the interpreter.
DRY_TEST_ARGS = ["tests/test_triton.py::test_single_row_decode",
                 "tests/test_compile.py::test_one_graph_for_every_token_count",
                 "-k", "triton-cpu-dynamic or test_single_row_decode"]


def _precompile(ctx: Context, env: dict) -> dict:
    """Compile the tests step's recorded plan in parallel over every core before pytest
    starts (when the warm cache is missing or was built by another Triton or other kernel
    sources): pytest then finds every kernel in the cache instead of compiling one at a
    time. Without a warm cache (whose archive holds the plan) the plan is recorded here
    first, on CPU (about 20 s)."""
    from .plan import record_plan

    started = time.perf_counter()
    plan = Path(os.environ["SALT_KERNELS_PLAN"]) if os.environ.get("SALT_KERNELS_PLAN") else None
    recorded = {}
    if plan is None or not plan.exists():  # no warm cache: record the selection's launches here, on CPU
        plan = ctx.step_dir("tests") / "plan.jsonl"
        recorded = dict(recorded_plan=record_plan(plan, tests_only=True),
                        record_s=round(time.perf_counter() - started, 1))
    import torch

    major, minor = torch.cuda.get_device_capability()
    cmd = [sys.executable, "-m", "salt_kernels.tools.aot", "--warm-cache", env["TRITON_CACHE_DIR"], "--plan",
           str(plan), "--arch", f"{major}{minor}", "--sources", "tests", "--jobs", str(os.cpu_count() or 1)]
    rc = _echo(cmd, cwd=REPO, env=env)
    return dict(precompiled=rc == 0, precompile_s=round(time.perf_counter() - started, 1), precompile_rc=rc,
                **recorded)


def step_tests(ctx: Context) -> dict:
    import xml.etree.ElementTree as ET

    junit = ctx.step_dir("tests") / "junit.xml"
    env = ctx.env()
    figs = {}
    if not ctx.dry_run:
        env["SALT_KERNELS_AUTOTUNE"] = "0"  # one config per launch: compile time; bench autotunes
        if os.environ.get("SALT_KERNELS_CACHE_USABLE") != "1":
            try:
                figs.update(_precompile(ctx, env))
            except Exception as exc:  # then pytest compiles as it goes
                traceback.print_exc()
                figs.update(precompiled=False, precompile_error=f"{type(exc).__name__}: {exc}")
    args = DRY_TEST_ARGS if ctx.dry_run else gpu_test_args()
    # Stopped PYTEST_STOP_BEFORE_S before the step's budget, pytest still writes its
    # report within its grace: the tests that ran are counted, not lost with a killed step.
    started = time.perf_counter()
    deadline = _budget("tests", ctx) - PYTEST_STOP_BEFORE_S - (figs.get("precompile_s") or 0)
    rc, stopped = _echo_until([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                               *args], deadline, cwd=REPO, env=env)
    if not junit.exists():
        return _result("fail", f"pytest rc={rc}, no report" + (" (stopped at the budget)" if stopped else ""),
                       stopped=stopped, **figs)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    figs.update(passed=passed, failed=counts["failures"] + counts["errors"], skipped=counts["skipped"],
                failed_tests=failed, pytest_rc=rc, stopped=stopped, pytest_s=round(time.perf_counter() - started, 1))
    ok = rc == 0 and passed > 0 and not stopped
    return _result("pass" if ok else "fail", f"{passed} passed, {figs['failed']} failed, {counts['skipped']} skipped"
                   + (f"; stopped at the budget after {figs['pytest_s']} s" if stopped else ""), **figs)


def step_numerics(ctx: Context) -> dict:
    """Each backend's results against float64 at small, odd sizes (salt-bench's
    verification), in fp32, fp16 and bf16 (fp32 only in a dry run)."""
    import torch

    from ..bench import verification_passed, verify_backends

    dtypes = [getattr(torch, d) for d in (NUMERICS_DTYPES[:1] if ctx.dry_run else NUMERICS_DTYPES)]
    results = verify_backends(ctx.device, dtypes)
    figs, bad = {}, []
    for backend, per_dtype in results.items():
        figs[backend] = {str(dt).replace("torch.", ""): dict(max_rel_err=e[0], tolerance=e[1], worst=e[2])
                         for dt, e in per_dtype.items()}
        bad += [f"{backend} {str(dt).replace('torch.', '')}: {e[0]:.1e} > {e[1]:.0e} ({e[2]})"
                for dt, e in per_dtype.items() if not verification_passed(e)]
        print(backend, figs[backend], flush=True)
    return _result("fail" if bad else "pass", "; ".join(bad) or
                   f"{', '.join(results)} match float64 in {', '.join(str(d).replace('torch.', '') for d in dtypes)}",
                   **figs)


def _max_rel(a, b) -> float:
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a.float() - b.float()).abs().max().item() / max(scale, 1e-30) if b.numel() else 0.0


def _fwd_bwd(fn, layer, x, grad_out):
    import torch

    x = x.detach().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    y = fn(x)
    return [y.detach(), *torch.autograd.grad(y, [x] + params, grad_out)]


def _tolerance(dtype) -> float:
    from ..bench import VERIFY_TOLERANCES
    return VERIFY_TOLERANCES[dtype]


def step_compile(ctx: Context) -> dict:
    """torch.compile(dynamic=True, fullgraph=True), forward and backward, six token counts:
    one compile per backend, results as eager's."""
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    from ... import SALTLinear, available_backends

    K, D, r, rl, counts, dtype = sizes(ctx)
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


def step_cudagraph(ctx: Context) -> dict:
    """Warm up, then capture forward and forward+backward in CUDA graphs at several token
    counts and replay them against eager."""
    import torch

    import salt_kernels
    from ... import SALTLinear

    K, D, r, rl, counts, dtype = sizes(ctx)
    counts = counts[:CUDAGRAPH_COUNTS]
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

    n = torch.cuda.device_count() if not ctx.dry_run else 0
    if n < 2:
        return _result("skip", f"needs >= 2 GPUs, found {n}", gpus=n)
    from ... import SALTLinear, available_backends

    K, D, r, rl, counts, dtype = sizes(ctx)
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


# salt-bench stops timing this long before the step's budget (its last shape finishes
# and it writes its tables and plots; the rows are on disk after every shape anyway).
BENCH_STOP_BEFORE_S = 25


def _bench_argv(ctx: Context, out: Path) -> list:
    o = bench_options(ctx)
    return [sys.executable, "-m", "salt_kernels.tools.bench", "--output", str(out), "--no-progress",
            "--device", o["device"], "--presets", o["presets"], "--dtype", o["dtype"], "--min-time", o["min_time"],
            "--json", str(out / "results.json"), "--deadline", str(_budget("bench", ctx) - BENCH_STOP_BEFORE_S)]


def _bench_results(out: Path) -> dict:
    """The benchmark's results.json (rewritten after every shape), else its results.csv's rows."""
    js = out / "results.json"
    if js.exists():
        return json.loads(js.read_text())
    with open(out / "results.csv", newline="") as f:
        return dict(rows=list(csv.DictReader(f)))


def step_bench(ctx: Context) -> dict:
    argv = _bench_argv(ctx, ctx.out / "bench")
    rc = _echo(argv, cwd=REPO, env=ctx.env())
    return bench_figures(ctx, rc, argv[1:])


def bench_figures(ctx: Context, rc=None, argv=None) -> dict:
    """The bench step's result from what salt-bench wrote (``rc`` None: the step was
    stopped, and these are the rows it had written by then)."""
    out = ctx.out / "bench"
    try:
        results = _bench_results(out)
    except OSError as exc:
        return _result("fail", f"salt-bench rc={rc}, no results: {exc}")
    rows = results.get("rows", [])
    kernels = results.get("triton_kernels") or {}
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
    untimed = sum(1 for r in rows if str(r.get("note") or "").startswith("not timed"))
    return _result(status, f"salt-bench rc={rc}, {len(rows)} rows" + (f", {untimed} not timed (deadline)" if untimed
                                                                      else ""),
                   argv=argv, rows=rows, by_method=summary, plots=plots, measured_auto_policy=policy,
                   auto_policy=AUTO_POLICY.get(ctx.device.split(":")[0]),
                   autotuned=kernels.get("autotuned", []), triton_spills=kernels.get("compiled", []))


# The steps in order: what only a GPU can tell first (build, numerics, CUDA graphs, speed),
# then torch.compile, then the broad test selection, which is stopped near its budget
# if it runs long. Each estimate is for one H100 with 16 cores and a warm Triton cache
# (docs/gpu.md shows them); the budget leaves at least 30 % on top. Autotuning is off
# where it only costs time (numerics, compile, tests); CUDA-graph warm-up and the
# benchmark autotune.
NO_AUTOTUNE = {"SALT_KERNELS_AUTOTUNE": "0"}
STEPS = [
    Step("environment", "Environment (GPU, driver, torch/triton/CUDA, modules, setuptools)", 26, 30, step_environment,
         estimate_s=18, basis="cold `import torch` on a fresh machine (~3 GB of CUDA libraries) ~8 s, CUDA "
         "init ~3 s, first nvidia-smi ~3 s, nvcc --version and module look-ups ~2 s"),
    Step("build", "Extension build (local arch only)", 83, 60, step_build,
         estimate_s=58, basis="one architecture, ninja with one job per core: the 6 sources compile in parallel, "
         "the slowest (a .cpp with the torch headers, or the .cu) ~45 s, link ~5 s, import check ~6 s"),
    Step("numerics", "Every backend against float64 at small sizes (fp32, fp16, bf16)", 25, 120, step_numerics,
         env=NO_AUTOTUNE, estimate_s=15, basis="start and CUDA init ~6 s; 3 odd shapes x 3 dtypes x 3 backends, "
         "forward and every gradient: ~40 Triton kernels, cache hits at ~0.02 s (compiled: ~0.4 s each) ~2 s; "
         "float64 ground truth on CPU ~2 s"),
    Step("cudagraph", "CUDA-graph capture after warm-up", 22, 60, step_cudagraph,
         estimate_s=15, basis="start ~6 s; warm-up at 4 token counts, forward and backward: ~28 autotune "
         "candidates timed at ~0.1 s each ~3 s; 4 captures of forward and of forward+backward, replays ~2 s"),
    Step("multigpu", "Device guard with 2+ GPUs", 9, 30, step_multigpu,
         estimate_s=6, basis="start and device count ~6 s (skipped on one GPU)"),
    Step("bench", "salt-bench GPU presets (tokens, decode, llama7b; bf16)", 86, 120, step_bench, salvage=bench_figures,
         estimate_s=60, basis="start ~8 s; verification ~4 s; 13 shapes x 2 modes x up to 6 methods, one "
         "do_bench each (0.1 s per measurement plus warm-up) ~25 s; peak-memory passes ~3 s; ~100 autotune "
         "timings ~10 s; plots ~4 s. Starts no shape later than 25 s before its budget (--deadline)"),
    Step("compile", "torch.compile(dynamic=True, fullgraph=True)", 72, 90, step_compile, env=NO_AUTOTUNE,
         estimate_s=50, basis="start ~6 s; one cold Inductor compile of forward and backward with dynamic "
         "shapes per backend, 3 backends, ~12 s each; 6 token counts eager and compiled ~4 s"),
    Step("tests", "GPU test suite, compiled kernels", 95, 120, step_tests,
         estimate_s=66, basis="start and collection ~10 s; ~370 tests with no compile (warm cache): "
         "test_triton.py and test_salt_linear.py ~30 s, ~200 hypothesis examples ~10 s, ~30 opcheck calls ~10 s, "
         "the rest ~6 s. Without a usable warm cache, the plan (~300 kernels; recorded here first, ~20 s, if "
         "no cache came with it) compiles in parallel, ~15 s on 16 cores. pytest is interrupted 25 s before the "
         "budget"),
]
assert sum(s.budget_s for s in STEPS) <= TOTAL_BUDGET_S
