"""The Triton launches the GPU check makes, recorded on CPU, and the Triton cache of a run.

**Recording.** Every Triton launch of salt_kernels can be planned as a list by three
functions (``backends.triton.kernels.forward_launches`` / ``backward_launches`` and
``backends.triton.multi.multi_launches``; ``LIST_LAUNCHES`` makes the ops use the first
two for every call). :func:`recording` replaces them, in this process, with versions
that plan exactly as on a GPU (``INTERPRET`` off while planning, so the precision and
dot flags are the GPU's), write each planned launch to a JSON-lines file, and fill the outputs with the torch path's results, launching nothing: the GPU check's
tests and steps then run on CPU at torch speed and record every launch they would make
on a GPU (:func:`record_plan`). A launch is recorded as what Triton specialises on:
the kernel, each argument (a tensor as its dtype and whether its address is 16-byte
aligned, a number as its value), the host's constexprs and the candidate configs.

``python -m salt_kernels.tools.aot --warm-cache DIR --plan FILE`` compiles that plan
for a GPU architecture into a Triton cache, off-GPU; the check points
``TRITON_CACHE_DIR`` at a copy of it (:func:`prepare_triton_cache`).

**The run's cache.** Triton's cache records each kernel's files by absolute path
(``__grp__*.json``), so a copied cache is relocated: those paths are rewritten to the
copy. Kernels and launchers compiled at run time are counted per step
(:func:`cache_counts`): with a complete warm cache, none.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .process import REPO, Context

PLAN_ENV = "SALT_KERNELS_RECORD_PLAN"  # a recording pytest appends its launches to this file
PLAN_AUTOTUNE_ENV = "SALT_KERNELS_RECORD_AUTOTUNE"  # "1": the recorded launches autotune
MANIFEST = "salt_kernels_cache.json"  # written by aot --warm-cache into the cache directory
PLAN_FILE = "plan.jsonl"  # the plan, kept next to the cache it was compiled from


def _kernel_name(fn) -> str:
    """``module:function`` of a JITFunction, an InterpretedFunction or an Autotuner."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return f"{fn.__module__}:{fn.__name__}"


def _encode_arg(a):
    import torch

    if isinstance(a, torch.Tensor):
        return {"tensor": str(a.dtype).replace("torch.", ""), "aligned": a.data_ptr() % 16 == 0}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise TypeError(f"cannot record a launch argument of type {type(a).__name__}")


def encode_launch(launch, autotune: bool, source: str) -> dict:
    """A launch as JSON: what Triton's binder specialises on, and the configs to compile
    (every candidate when the launch autotunes, else the first, as ``_run`` launches)."""
    configs = launch.configs if autotune else launch.configs[:1]
    return dict(source=source, name=launch.name, kernel=_kernel_name(launch.fn),
                args=[_encode_arg(a) for a in launch.args], kwargs=launch.kwargs,
                configs=[dict(kwargs=c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs])


@contextlib.contextmanager
def _planning_as_on_gpu(tk):
    """Plan with the GPU's precision and dot flags (they follow ``INTERPRET``)."""
    old, tk.INTERPRET = tk.INTERPRET, False
    try:
        yield
    finally:
        tk.INTERPRET = old


@contextlib.contextmanager
def recording(path, source: str, autotune: bool):
    """Within: every Triton launch salt_kernels plans is appended to ``path`` (JSON
    lines) and none runs: the planners plan as on a GPU, fill their outputs with the
    torch path's results and return their launches, which ``_run`` then skips."""
    from ...backends import reference
    from ...backends.triton import kernels as tk, multi as tm

    real = tk.forward_launches, tk.backward_launches, tm.multi_launches, tk._run, tk.LIST_LAUNCHES
    seen = set()

    def sink(launches):
        with open(path, "a") as f:
            for L in launches:
                line = json.dumps(encode_launch(L, autotune, source), sort_keys=True)
                if line not in seen:
                    seen.add(line)
                    f.write(line + "\n")
        return launches

    def fill(outs, values):
        for out, value in zip(outs, values):
            if out.numel():
                out.copy_(value)
        return outs

    def forward_launches(x, U, V, C, bias):
        with _planning_as_on_gpu(tk):
            y, Z, launches = real[0](x, U, V, C, bias)
        return (*fill((y, Z), tk._forward_torch(x, U, V, C, bias)), sink(launches))

    def backward_launches(G, Z, U, V, C, need_dx, need_dC, need_db):
        with _planning_as_on_gpu(tk):
            dx, dC, db, launches = real[1](G, Z, U, V, C, need_dx, need_dC, need_db)
        return (*fill((dx, dC, db), tk._backward_torch(G, Z, U, V, C, need_dx, need_dC, need_db)), sink(launches))

    def multi_launches(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling):
        with _planning_as_on_gpu(tk):
            y, launches = real[2](x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling)
        y.copy_(reference.multi_linear_2d(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling))
        return y, sink(launches)

    tk.forward_launches, tk.backward_launches, tm.multi_launches = forward_launches, backward_launches, multi_launches
    tk._run = lambda launches, device: None
    tk.LIST_LAUNCHES = True  # every call through the planners above
    try:
        yield
    finally:
        tk.forward_launches, tk.backward_launches, tm.multi_launches, tk._run, tk.LIST_LAUNCHES = real


# pytest plugin (``-p salt_kernels.tools.gpucheck.plan``): records while PLAN_ENV is set.
_PYTEST_RECORDING = []


def pytest_configure(config):
    if os.environ.get(PLAN_ENV):
        cm = recording(os.environ[PLAN_ENV], "tests", os.environ.get(PLAN_AUTOTUNE_ENV) == "1")
        cm.__enter__()
        _PYTEST_RECORDING.append(cm)


def pytest_unconfigure(config):
    while _PYTEST_RECORDING:
        _PYTEST_RECORDING.pop().__exit__(None, None, None)


def _record_steps(path) -> None:
    """Record the launches of the numerics, cudagraph, compile and bench steps at their
    GPU sizes (this process must have TRITON_INTERPRET=1: the Triton backend then runs
    on CPU tensors, and :func:`recording` keeps it from running anything)."""
    import torch

    from ... import SALTLinear, warmup
    from ..bench import verify_backends
    from ..bench.methods import Method, _salt_forward, make_input_sets, make_step, rank_skip_reason, salt_inputs
    from ..bench.presets import select_shapes
    from . import workload

    gpu = Context(Path(path).parent, dry_run=False)
    K, D, r, rl, counts, dtype = workload.sizes(gpu)
    with recording(path, "numerics", autotune=False):
        verify_backends("cpu", [getattr(torch, d) for d in workload.NUMERICS_DTYPES], ["triton"])
    torch.manual_seed(0)
    layer = SALTLinear(K, D, r, rl, backend="triton", dtype=dtype)
    with recording(path, "cudagraph", autotune=True):
        warmup(layer, counts[:workload.CUDAGRAPH_COUNTS], dtype=dtype, backward=True)
    with recording(path, "compile", autotune=False):  # the ops are opaque: planned as in eager
        warmup(layer, counts, dtype=dtype, backward=True)
    bench = workload.bench_options(gpu)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[bench["dtype"]]
    with recording(path, "bench", autotune=True):
        verify_backends("cpu", list(dict.fromkeys([torch.float32, dtype])), ["triton"])
        # salt-bench's triton method (on CPU it would leave the interpreted backend out)
        method = Method("triton", "salt", salt_inputs, _salt_forward("triton"),
                        skip_reason=lambda s: rank_skip_reason("triton", s))
        for shape in select_shapes(bench["presets"].split(",")):
            if method.skip_reason(shape):
                continue
            sets = make_input_sets(method, shape, dtype, "cpu", target_bytes=0)
            for mode in ("fwd", "fwd+bwd"):
                make_step(method, sets, mode)()


def record_plan(path, tests_only: bool = False) -> dict:
    """Record every Triton launch the GPU check makes into ``path`` (JSON lines): the
    tests step's selection (run on CPU with the CPU twins of its CUDA-only test ids,
    under pytest with this module as a plugin) and, unless ``tests_only``, the other
    steps at their GPU sizes. Returns counts per source."""
    from .workload import gpu_test_args

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("SALT_KERNELS_AUTOTUNE",)}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", __name__,
           *gpu_test_args(record=True)]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=REPO, env={**env, PLAN_ENV: str(path), PLAN_AUTOTUNE_ENV: "0"})
    code = f"from {__name__} import _record_steps; _record_steps({str(path)!r})"
    rc_steps = 0 if tests_only else subprocess.call([sys.executable, "-c", code], cwd=REPO, env=env)
    if rc_steps != 0:
        raise RuntimeError(f"recording the steps' launches failed (exit status {rc_steps})")
    counts = {}
    for line in path.read_text().splitlines():
        src = json.loads(line)["source"]
        counts[src] = counts.get(src, 0) + 1
    return dict(launches=counts, pytest_rc=rc)


def read_plan(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- the run's Triton cache -------------------------------------------------------------

def relocate_cache(cache_dir) -> int:
    """Point every kernel group of a copied Triton cache at the copy's own files (Triton
    stores absolute paths there), leaving out files that are not there (some Tritons
    treat a group with a missing file as a miss); returns the number of groups rewritten."""
    cache_dir = Path(cache_dir).resolve()
    n = 0
    for grp in cache_dir.glob("*/__grp__*.json"):
        data = json.loads(grp.read_text())
        paths = data.get("child_paths") or {}
        moved = {name: str(grp.parent / Path(p).name) for name, p in paths.items()
                 if (grp.parent / Path(p).name).exists()}
        if moved != paths:
            grp.write_text(json.dumps({"child_paths": moved}))
            n += 1
    return n


def kernel_sources_sha() -> str:
    """A hash of the Triton backend's source files: a kernel's cache key holds its source
    (and line numbers), so a cache built from other sources misses."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "salt_kernels" / "backends" / "triton").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _triton_identity() -> dict:
    """What this Triton's cache keys depend on besides the kernel: its version and build
    (the hash of its own sources and library), the ptxas it runs, the environment
    variables that change code generation, and this Python's extension suffix (the
    launchers are Python extension modules)."""
    import hashlib
    import sysconfig

    try:
        import triton
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from triton.runtime.cache import triton_key
    except ImportError as exc:
        return dict(error=f"{type(exc).__name__}: {exc}")
    ident = dict(kernel_sources=kernel_sources_sha(), triton=triton.__version__,
                 triton_key=hashlib.sha256(triton_key().encode()).hexdigest()[:16],
                 env_vars=get_cache_invalidating_env_vars(), ext_suffix=sysconfig.get_config_var("EXT_SUFFIX"))
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
        ident["ptxas"] = get_ptxas_version()
    except Exception as exc:  # another backend, or no ptxas
        ident["ptxas"] = f"unknown ({type(exc).__name__})"
    return ident


def _count_files(cache_dir) -> dict:
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return dict(kernels=0, launchers=0)
    return dict(kernels=sum(1 for _ in cache_dir.glob("*/__grp__*.json")),
                launchers=sum(1 for _ in cache_dir.glob("*/__triton_launcher*")))


def prepare_triton_cache(ctx: Context, warm_cache=None) -> dict:
    """Make ``ctx.out/triton-cache`` this run's Triton cache (TRITON_CACHE_DIR for every
    step): a relocated copy of ``warm_cache`` (a directory, or a .tar.xz of one) when
    given, else empty. Returns what the report says of it: the manifest, whether it was
    built by this Triton (same identity: its keys can hit) and, per step, what compiled at
    run time."""
    import tarfile

    run_dir = ctx.out / "triton-cache"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    info = dict(dir=str(run_dir), warm_cache=str(warm_cache) if warm_cache else None, per_step={})
    src = Path(warm_cache) if warm_cache else None
    if src is None:
        info.update(usable=False, summary="no warm cache: kernels compile at run time")
    elif not src.exists():
        info.update(usable=False, summary=f"--warm-cache {src} does not exist: kernels compile at run time")
    else:
        if src.is_dir():
            shutil.copytree(src, run_dir)
        else:
            with tarfile.open(src) as tar:  # the archive holds one folder: the cache
                top = {m.name.split("/")[0] for m in tar.getmembers()}
                tar.extractall(ctx.out / "triton-cache.unpacked")
            shutil.move(str(ctx.out / "triton-cache.unpacked" / top.pop()), run_dir)
            shutil.rmtree(ctx.out / "triton-cache.unpacked")
        manifest_path = run_dir / MANIFEST
        if not manifest_path.exists():
            info.update(usable=False, summary=f"--warm-cache {src}: no {MANIFEST} in it (not built by "
                        "python -m salt_kernels.tools.aot --warm-cache); kernels compile at run time")
        else:
            manifest = json.loads(manifest_path.read_text())
            ctx.extra_env["SALT_KERNELS_PLAN"] = str(run_dir / PLAN_FILE)  # the tests step's fallback
            info["relocated_groups"] = relocate_cache(run_dir)
            built = manifest.get("identity", {})
            here = _triton_identity() if not ctx.dry_run else {}
            same = {k: built.get(k) == here.get(k) for k in ("kernel_sources", "triton", "triton_key", "ptxas",
                                                              "env_vars", "ext_suffix")} if here else {}
            usable = all(same.values()) if same else None
            if usable:
                ctx.extra_env["SALT_KERNELS_CACHE_USABLE"] = "1"
            info.update(manifest=manifest, identity=here, same_identity=same, usable=usable)
            counts = _count_files(run_dir)
            info["summary"] = (f"warm cache {src.name}: {counts['kernels']} kernels, {counts['launchers']} "
                               f"launchers, built for sm_{','.join(map(str, manifest.get('archs', [])))} with "
                               f"triton {built.get('triton')}" + (
                                   "" if usable is None else "; this Triton matches, its keys can hit" if usable
                                   else f"; NOT this Triton build ({[k for k, v in same.items() if not v]} "
                                        "differ): kernels compile at run time"))
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx.extra_env["TRITON_CACHE_DIR"] = str(run_dir)
    info["at_start"] = _count_files(run_dir)
    return info


def cache_counts(info: dict, before: dict | None = None) -> dict:
    """Files in the run's cache now; with ``before``, what was added since: kernels
    compiled and launchers built at run time (cache misses)."""
    now = _count_files(info["dir"])
    if before is None:
        return now
    return dict(compiled=now["kernels"] - before["kernels"], launchers_built=now["launchers"] - before["launchers"])
