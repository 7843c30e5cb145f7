"""``python -m salt_kernels.tools.aot``: compile every Triton kernel launch ahead of time, no GPU needed.

What is compiled is what runs. The launches come from the launcher itself:
``backends.triton.kernels.forward_launches`` / ``backward_launches`` (the functions the ops
call) are run on CPU tensors for a set of scenarios (token counts from decode to large
M, every padded rank both at r = R_PAD and at an odd rank (rank strides not multiples of
16), fp32 and bf16 (fp16 shares bf16's tiles and code shape), contiguous, transposed,
non-unit-stride and stride-0 inputs (``--full`` adds odd sizes, transposed U/V, r = 1
and ranks that are multiples of 8 only), every combination of needed gradients), and
``backends.triton.multi.multi_launches`` (the mixed-adapter forward) for every rank and bias
mode it serves. For each
launch and each autotune candidate the specialisation is derived by Triton's own JIT
code (``create_function_from_signature`` + ``JITFunction._pack_args``, the path
``JITFunction.run`` takes before it compiles), so the signature, the ``==1`` constants,
the divisibility-16 hints and the constexprs (precision included) are exactly those of
a launch on the GPU. Each distinct specialisation is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for sm_80 and
sm_90. Registers and spills come from the ``ptxas`` shipped in the triton wheel,
shared memory from the compiled metadata.

Prints one row per compile and exits non-zero if any compile fails, spills, uses more
than ``MAX_REGISTERS`` registers (headroom below the 255 ceiling, so that the next
Triton's register allocation does not tip a config into spilling) or needs more shared
memory than the architecture allows (docs/design.md, "Verifying GPU code without a GPU").

``--triton-venv DIR`` (repeatable) runs the same check with another environment's
Python (a venv with that Triton and a CPU torch) on this source tree, and fails if any
of them fails: ``.ci/aot_triton_versions.sh`` uses it for every supported Triton.

``--warm-cache DIR`` fills a Triton cache directory, off-GPU, with every kernel the GPU
check launches (``salt_kernels.tools.gpucheck``), for sm_90 (``--arch 80`` for sm_80;
repeatable). What the check launches is its plan (``--plan FILE``, default
``DIR/plan.jsonl``, recorded first if absent: :func:`salt_kernels.tools.gpucheck.plan.record_plan`).
Each planned launch is compiled through Triton's own runtime path: the JIT function's
``warmup`` with the active driver replaced by one that reports the GPU's target, so the
binder, the options and the cache key are those of a launch on that GPU; its C launcher
is built too (linked against a stub ``libcuda.so.1``; the real one is loaded on the
GPU). A second run over the same directory compiles nothing. The cache's keys hold
this Triton's build and this Python's version: build it with the GPU machine's
(``.ci/gpu_check.sh --download`` does, in a small venv). ``DIR/salt_kernels_cache.json``
records what was built and with what.

``--record FILE`` keeps a record of clean runs: before compiling, the check computes a
fingerprint of everything the result depends on (the Triton version, the mode, and the
bytes of ``salt_kernels/backends/**/*.py`` and this file). If FILE holds a clean run with
that fingerprint, it prints that run's results and compiles nothing (the same sources
through the same Triton compile to the same code); otherwise it compiles and, when
clean, writes the run into FILE. ``SALT_AOT_FORCE=1`` compiles anyway. CI uses
``.ci/aot-verified.json``: it recompiles only for a Triton whose kernels changed.

Must run without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` functions
are not compilable); if the variable is set, this re-runs itself without it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block
MAX_REGISTERS = 240  # per thread; the hardware ceiling is 255
ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16")  # fp16 has bf16's tiles and code shape (only the MMA type differs)
R_PADS = (16, 32, 64, 128, 256)  # every padded rank the host can pick (rank_tiles)
# Ranks checked. Only the rank strides depend on r (the rows of U/V, Z, the core and the
# split partials, M*r), and Triton specialises each as == 1, divisible by 16 or neither:
# r = R_PAD makes all of them multiples of 16; an odd rank in each padded rank's bucket,
# R_PAD/2 + 1, makes none of them one (M*r only at M a multiple of 16), and the host picks
# other configs for it (backends.triton.kernels.rank_aligned). ``--full`` adds r = 1 (rank strides
# == 1) and R_PAD/2 + 8 (multiples of 8 only: M*r 16-aligned at every even M).
ODD_RANKS = tuple(R // 2 + 1 for R in R_PADS)  # 9, 17, 33, 65, 129
FULL_RANKS = (1,) + tuple(R // 2 + 8 for R in R_PADS)  # 1, 16 (aligned: skipped), 24, 40, 72, 136
# (M, K, D): the row tiles block_m returns (16, 32, 64), split (decode) and unsplit shrinks.
SIZES = ((1, 512, 512), (32, 512, 512), (4096, 256, 256))
# The needed gradients (dx, dC, db): training, frozen x (first layer), frozen adapter
# (dx only) and bias-only training.
NEEDS = ((True, True, True), (False, True, True), (True, False, False), (False, False, True))


def ranks(full: bool = False) -> tuple:
    """Every rank the check plans launches for (see ODD_RANKS)."""
    return R_PADS + ODD_RANKS + (tuple(r for r in FULL_RANKS if r % 16) if full else ())


def _scenarios(full: bool = False):
    """(name, M, K, D, layout) for every launch shape checked; layouts: "contiguous",
    "transposed" (x and G stored column-major), "strided" (every other column of a
    wider x / G), "stride0" (G an expanded scalar, as from y.sum()); with ``full`` also
    "odd" (sizes, so row strides, not multiples of 16), "transposed" at an odd M and
    "basis_t" (U and V stored transposed: the ops copy them to a unit rank stride, so this
    checks that path plans the contiguous specialisations); "transposed M19" gives the
    32-row tiles with transposed x and G at every padded rank (R_PAD 128 included)."""
    out = [(f"contiguous M{M}", M, K, D, "contiguous") for M, K, D in SIZES]
    out += [("transposed M64", 64, 512, 512, "transposed"), ("strided", 48, 512, 512, "strided"),
            ("stride0", 48, 512, 512, "stride0")]
    if full:
        out += [("odd", 70, 1031, 517, "odd"), ("transposed M70", 70, 512, 512, "transposed"),
                ("transposed M19", 19, 512, 512, "transposed"), ("basis_t", 48, 512, 512, "basis_t")]
    return out


def _tensors(torch, M, K, D, r, dtype, layout):
    """x, G, U, V, C, bias for one scenario (CPU tensors: only their strides, dtypes and
    pointer alignment matter to the specialisation)."""
    def mat(rows, cols, transposed=False, every_other=False):
        if transposed:
            return torch.empty((cols, rows), dtype=dtype).t()
        if every_other:
            return torch.empty((rows, 2 * cols), dtype=dtype)[:, ::2]
        return torch.empty((rows, cols), dtype=dtype)

    x = mat(M, K, transposed=layout == "transposed", every_other=layout == "strided")
    G = mat(M, D, transposed=layout == "transposed", every_other=layout == "strided")
    if layout == "stride0":
        G = torch.empty((), dtype=dtype).expand(M, D)
    U, V = mat(D, r, transposed=layout == "basis_t"), mat(K, r, transposed=layout == "basis_t")
    C = torch.empty((r, r), dtype=torch.float32)
    return x, G, U, V, C, torch.empty((D,), dtype=dtype)


def launches(full: bool = False):
    """Every launch the launcher plans over the scenarios: (scenario, Launch)."""
    import torch

    from ..backends.triton import kernels as tk

    out = []
    for name, M, K, D, layout in _scenarios(full):
        for dtype in DTYPES:
            for r in ranks(full):
                x, G, U, V, C, bias = _tensors(torch, M, K, D, r, getattr(torch, dtype), layout)
                U, V = tk.basis_for_kernels(U), tk.basis_for_kernels(V)  # as the ops do
                for b in (bias, None):
                    _, Z, fwd = tk.forward_launches(x, U, V, C, b)
                    out += [(f"{name} r{r}", L) for L in fwd]
                for needs in NEEDS:
                    *_, bwd = tk.backward_launches(G, Z, U, V, C, *needs)
                    out += [(f"{name} r{r}", L) for L in bwd]
    return out + multi_launches(full)


# Mixed-adapter forward (backends.triton.multi): adapters in the bank, r' of each core.
MULTI_A, MULTI_RL = 3, 8
# bias: none, shared (D,), banked (A, D), banked with a base bias and base sigma for index -1 rows
MULTI_BIAS = ("none", "shared", "banked", "banked+base")


def multi_launches(full: bool = False):
    """Every launch the mixed-adapter Triton forward plans: both dtypes at every rank of
    :func:`ranks` it serves (larger ones go to the C++ op), every bias mode, contiguous
    and strided x, at a decode and a large M: (scenario, Launch)."""
    import torch

    from ..backends.triton import kernels as tk
    from ..backends.triton import multi as tm

    out = []
    for layout, M in (("contiguous", 1), ("contiguous", 4096), ("strided", 48)):
        K = D = 512
        for dtype in DTYPES:
            dt = getattr(torch, dtype)
            for r in ranks(full):
                name = f"multi {layout} M{M} r{r}"
                R_PAD = tk.rank_tiles(r)[0]
                if R_PAD > tm.MULTI_MAX_RANK[dt]:  # served by another backend
                    continue
                x, _, U, V, _, _ = _tensors(torch, M, K, D, r, dt, layout)
                U, V = tk.basis_for_kernels(U), tk.basis_for_kernels(V)  # as the op does
                A, rl = MULTI_A, MULTI_RL
                sigma, X, Y = (torch.empty(s, dtype=dt) for s in ((A, r), (A, r, rl), (A, rl, r)))
                index = torch.arange(M) % (A + 1) - 1  # every adapter and the base (-1)
                for mode in MULTI_BIAS:
                    bias = {"none": None, "shared": torch.empty((D,), dtype=dt)}.get(mode, torch.empty((A, D), dtype=dt))
                    base = mode == "banked+base"
                    base_sigma = torch.empty((r,), dtype=dt) if base else None
                    base_bias = torch.empty((D,), dtype=dt) if base else None
                    _, launches = tm.multi_launches(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, 0.5)
                    out += [(name, L) for L in launches]
    return out


def specialization(launch, config, arch: int):
    """(signature, constexprs, attrs, options) of ``launch`` at ``config`` on sm_``arch``,
    computed as ``JITFunction.run`` does before compiling."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = launch.config_kwargs(config)
    kwargs["debug"] = fn.debug or knobs.runtime.debug
    for opt, knob in (("instrumentation_mode", "instrumentation_mode"),
                      ("fpsan_homomorphic_casts", "fpsan_homomorphic_casts")):
        if hasattr(knobs.compilation, knob):  # options newer Tritons add in run()
            kwargs[opt] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, spec, options)
    return signature, constexprs, attrs, options


def _describe(launch, config, signature, constexprs, attrs):
    """Short, stable text for a specialisation: the host constexprs, the config, and the
    runtime specialisation of each non-constexpr argument (=1, /16 or plain)."""
    names = launch.fn.arg_names
    ints = []
    for i, n in enumerate(names):
        if n in launch.kwargs or n in config.kwargs:
            continue
        ty = signature[n]
        div16 = ["tt.divisibility", 16] in attrs.get((i,), [])  # (attrs lists every argument)
        if ty == "constexpr":
            ints.append(f"{n}=1")
        elif div16 and not ty.startswith("*"):
            ints.append(f"{n}/16")
        elif ty.startswith("*") and not div16:
            ints.append(f"{n}:unaligned")
    return ints


def jobs(full: bool = False, only: str | None = None):
    """The distinct (launch, config, arch) specialisations, each with the scenarios that
    produce it (``only``: those of scenarios whose name starts with it)."""
    seen = {}
    for scen, L in launches(full):
        if only and not scen.startswith(only):
            continue
        for c in L.configs:
            for arch in ARCHS:
                sig, consts, attrs, opts = specialization(L, c, arch)
                key = (L.name, repr(sorted(sig.items())), repr(sorted(consts.items(), key=str)),
                       repr(sorted(attrs.items())), opts.num_warps, opts.num_stages, arch)
                if key not in seen:
                    seen[key] = dict(launch=L, config=c, arch=arch, scenarios=[])
                seen[key]["scenarios"].append(scen)
    return list(seen.values())


_JOBS: list = []  # set before the worker processes fork (Launch grids are lambdas: not picklable)


def _io_dtype(L) -> str:
    named = dict(zip(L.fn.arg_names, L.args))
    t = next(named[n] for n in ("a_ptr", "b_ptr", "out_ptr") if n in named)
    return str(t.dtype).replace("torch.", "")


def compile_index(i: int):
    return compile_one(_JOBS[i])


def compile_one(job):
    """Compile one specialisation; return a result row."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    L, c, arch = job["launch"], job["config"], job["arch"]
    flags = ",".join([k for k, v in L.kwargs.items() if v is True] + [str(L.kwargs.get("PRECISION", ""))])
    row = dict(kernel=L.name, flags=flags, R_PAD=L.kwargs.get("R_PAD", 0), BM=L.kwargs.get("BM", 0),
               BN=c.kwargs.get("BN", L.kwargs.get("BN", 0)), warps=c.num_warps, stages=c.num_stages, dtype=_io_dtype(L), arch=arch,
               regs=None, spill=None, smem=None, error=None, scenarios=sorted(set(job["scenarios"])))
    t0 = time.time()
    try:
        sig, consts, attrs, opts = specialization(L, c, arch)
        row["spec"] = " ".join(_describe(L, c, sig, consts, attrs))
        src = ASTSource(L.fn, sig, constexprs=consts, attrs=attrs)
        # Triton runs the wheel's ptxas with -v itself; keep its log instead of a second run.
        triton.knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts.__dict__)
        row["smem"] = compiled.metadata.shared
        text = log.getvalue()
        if "Used" not in text:  # cache hit (no ptxas run): ask ptxas directly
            text = _ptxas_log(compiled.asm["ptx"], arch)
        row["regs"], row["spill"] = _parse_ptxas(text)
    except Exception as exc:  # reported in the table, and makes the run fail
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    row["seconds"] = time.time() - t0
    return row


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_log(ptx: str, arch: int) -> str:
    sm = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    return out.stdout + out.stderr


def _parse_ptxas(text: str) -> tuple[int, int]:
    """(registers, spill bytes: stores + loads) from a ``ptxas -v`` log."""
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spill


def _name(r) -> str:
    return (f"{r['kernel']}[{r['flags']}] R{r['R_PAD']} BM{r['BM']} BN{r['BN']} w{r['warps']} s{r['stages']} "
            f"{r['dtype']} sm_{r['arch']} ({r.get('spec', '')})")


def check(rows) -> list[str]:
    problems = []
    for r in rows:
        if r["error"]:
            problems.append(f"{_name(r)}: compile failed: {r['error']}")
        elif r["spill"]:
            problems.append(f"{_name(r)}: spills {r['spill']} bytes")
        elif r["regs"] > MAX_REGISTERS:
            problems.append(f"{_name(r)}: {r['regs']} registers > {MAX_REGISTERS} (no headroom)")
        elif r["smem"] > SMEM_LIMIT[r["arch"]]:
            problems.append(f"{_name(r)}: shared memory {r['smem']} > {SMEM_LIMIT[r['arch']]}")
    return problems


def _other_venvs(venvs, argv) -> int:
    """Run this check under each venv's Python on this source tree; 1 if any fails."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    results = []
    for venv in venvs:
        py = os.path.join(venv, "bin", "python")
        t0 = time.time()
        rc = subprocess.call([py, "-m", "salt_kernels.tools.aot", *argv], env=env, cwd=root)
        results.append((venv, rc, time.time() - t0))
    for venv, rc, secs in results:
        print(f"AOT {'OK  ' if rc == 0 else 'FAIL'} {venv} ({secs:.0f} s)")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


# --- --warm-cache: the GPU check's kernels into a Triton cache, off-GPU --------------------

WARM_ARCHS = (90,)


class _TargetDriver:
    """Stands in for Triton's CUDA driver while compiling without a GPU: it reports the
    GPU's target, and one device per architecture (so that each gets its own binder)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)


def _stub_libcuda(directory: str) -> str | None:
    """An empty ``libcuda.so.1`` for linking Triton's launchers where no driver is
    installed: they only record the name and are bound to the real driver on the GPU.
    None if it cannot be built (then Triton looks for the real one)."""
    path = os.path.join(directory, "libcuda.so.1")
    if not os.path.exists(path):
        try:
            subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", path, "-x", "c", "/dev/null"],
                           check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"note: no stub libcuda.so.1 ({exc}); launchers link against the installed driver, if any")
            return None
    return directory


def _decode_arg(a):
    """A recorded launch argument as the binder sees it (a tensor: its dtype and whether
    its address is 16-byte aligned; its contents and shape do not matter)."""
    import torch

    if isinstance(a, dict) and "tensor" in a:
        t = torch.empty(64, dtype=getattr(torch, a["tensor"]))
        return t if a["aligned"] else t[1:]
    return a


def _planned_launch(rec: dict, cfg: dict):
    """(Launch, Config) of one recorded launch at one of its configs."""
    import importlib

    import triton

    from ..backends.triton import kernels as tk

    module, name = rec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    config = triton.Config(cfg["kwargs"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    # no grid and no launch-time keywords: only compiled, never launched
    return tk.Launch(rec["name"], fn, None, tuple(_decode_arg(a) for a in rec["args"]), rec["kwargs"], [config],
                     None, None), config


def warm_jobs(plan: list, archs, sources=None) -> list:
    """The distinct specialisations (launch, config, arch) to compile for a recorded
    plan, each with the steps that launch it: launches that differ only in
    unspecialised sizes compile once."""
    seen = {}
    for rec in plan:
        if sources and rec["source"] not in sources:
            continue
        for cfg in rec["configs"]:
            launch, config = _planned_launch(rec, cfg)
            for arch in archs:
                sig, consts, attrs, opts = specialization(launch, config, arch)
                key = (rec["kernel"], repr(sorted(sig.items())), repr(sorted(consts.items(), key=str)),
                       repr(sorted(attrs.items())), repr(sorted(opts.__dict__.items())), arch)
                job = seen.setdefault(key, dict(record=rec, config=cfg, arch=arch, sources=[]))
                if rec["source"] not in job["sources"]:
                    job["sources"].append(rec["source"])
    return list(seen.values())


_WARM: dict = {}  # set before the worker processes fork


def _warm_setup() -> None:
    """Once per worker: compile for a target without a GPU, build launchers against the
    stub driver, keep only what a launch loads (cubin and metadata), count cache hits."""
    import ctypes

    import triton
    from triton import knobs

    if _WARM.get("ready"):
        return
    if _WARM["stub"]:
        knobs.nvidia.libcuda_path = _WARM["stub"]
        ctypes.CDLL(os.path.join(_WARM["stub"], "libcuda.so.1"), mode=os.RTLD_GLOBAL)
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)  # launchers load without the driver's symbols
    knobs.compilation.store_binary_only = True  # not part of the key: the cache stays small
    _WARM["hits"] = []
    knobs.compilation.listener = lambda **kw: _WARM["hits"].append(bool(kw.get("cache_hit")))
    _WARM["ready"] = triton.__version__


def warm_index(i: int) -> dict:
    return warm_one(_WARM["jobs"][i])


def warm_one(job) -> dict:
    """Compile one planned launch at one config for one architecture through the JIT
    function's warmup (Triton's runtime path), and build its launcher."""
    from triton.runtime.driver import driver

    _warm_setup()
    rec, cfg, arch = job["record"], job["config"], job["arch"]
    row = dict(kernel=rec["kernel"].split(":")[1], arch=arch, config=cfg, sources=job["sources"], hit=None,
               launcher=None, error=None)
    t0 = time.time()
    try:
        launch, config = _planned_launch(rec, cfg)
        driver.set_active(_TargetDriver(arch))
        del _WARM["hits"][:]
        kernel = launch.fn.warmup(*launch.args, grid=(1,), **launch.config_kwargs(config))
        row["hit"] = _WARM["hits"][-1] if _WARM["hits"] else True  # no listener call: already built here
        from triton.backends.nvidia import driver as nvidia_driver
        if hasattr(nvidia_driver, "make_launcher"):  # a C launcher per signature (triton 3.6; later: generic)
            try:
                nvidia_driver.CudaLauncher(kernel.src, kernel.metadata)  # builds into the cache, or finds it
                row["launcher"] = "ok"
            except Exception as exc:  # the .so is cached before it is loaded; loading may need the driver
                row["launcher"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    row["seconds"] = round(time.time() - t0, 3)
    return row


def _cuda_utils_module() -> str:
    """Build Triton's driver utilities module into the cache (one per Triton and Python)."""
    try:
        _warm_setup()
        from triton.backends.nvidia.driver import CudaUtils
        CudaUtils()
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def warm_cache(cache_dir: str, plan_path: str | None, archs, sources=None, jobs_n: int = 1) -> int:
    """``--warm-cache``: compile the GPU check's plan into ``cache_dir``; 0 if every
    kernel compiled (or was already there)."""
    import shutil

    import triton

    from .gpucheck.plan import (MANIFEST, PLAN_FILE, _count_files, _triton_identity, read_plan, record_plan,
                                 relocate_cache)

    cache_dir = os.path.abspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    stored_plan = os.path.join(cache_dir, PLAN_FILE)
    if plan_path is None and not os.path.exists(stored_plan):
        print(f"recording the GPU check's launches into {stored_plan} ...", flush=True)
        print(record_plan(stored_plan), flush=True)
    elif plan_path is not None and os.path.abspath(plan_path) != stored_plan:
        shutil.copyfile(plan_path, stored_plan)
    plan = read_plan(stored_plan)
    todo = _WARM["jobs"] = warm_jobs(plan, archs, sources)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    before = _count_files(cache_dir)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="salt_stub_cuda_") as stub:
        _WARM["stub"] = _stub_libcuda(stub)
        with ProcessPoolExecutor(max_workers=max(1, jobs_n)) as pool:
            utils = pool.submit(_cuda_utils_module)
            rows = list(pool.map(warm_index, range(len(todo)), chunksize=4))
            utils = utils.result()
    for source in Path(cache_dir).glob("*/*.source"):  # the kernel's first IR: a cache hit never reads it
        source.unlink()
    relocate_cache(cache_dir)  # (drops the deleted files from their groups)
    after = _count_files(cache_dir)
    failed = [r for r in rows if r["error"]]
    compiled = sum(1 for r in rows if r["hit"] is False)
    summary = dict(kernels=len(rows), compiled=compiled, cache_hits=len(rows) - compiled - len(failed),
                   failed=len(failed), new_kernel_files=after["kernels"] - before["kernels"],
                   new_launchers=after["launchers"] - before["launchers"], seconds=round(time.time() - t0, 1))
    for r in failed:
        print(f"FAIL {r['kernel']} sm_{r['arch']} {r['config']}: {r['error']}", flush=True)
    bad_launchers = [r for r in rows if r["launcher"] not in ("ok", None)]
    manifest = dict(tool="python -m salt_kernels.tools.aot --warm-cache", root=cache_dir,
                    created=time.strftime("%Y-%m-%d %H:%M:%S"), archs=sorted(set(archs)), sources=sources,
                    identity=_triton_identity(), python=sys.version.split()[0], summary=summary,
                    cuda_utils=utils, launcher_notes=sorted({r["launcher"] for r in bad_launchers})[:5],
                    plan_launches=len(plan), size_bytes=sum(os.path.getsize(os.path.join(d, f))
                                                            for d, _, fs in os.walk(cache_dir) for f in fs))
    with open(os.path.join(cache_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"warm cache {cache_dir} (triton {triton.__version__}, sm_{','.join(map(str, archs))}): "
          f"{len(rows)} kernels: {compiled} compiled, {summary['cache_hits']} already there, {len(failed)} failed; "
          f"{summary['new_launchers']} launchers built; {manifest['size_bytes'] / 2 ** 20:.1f} MiB in "
          f"{summary['seconds']:.0f} s", flush=True)
    return 1 if failed else 0


# --- --record: clean runs, keyed by what their result depends on -------------------------

# The sources a compile's result depends on: the kernels and their launch plans (the
# Triton backend's modules) and the specialisations listed here. Those modules take from
# the rest of the package only the host path's glue (EAGER_IMPORTS); tests/test_aot.py
# fails if they import anything else, which might change a plan without changing this.
KERNEL_SOURCES = "backends/triton"
EAGER_IMPORTS = {"..autograd": {"eager_function", "register_salt_autograd", "run_salt_eager", "run_salt_op"},
                 "..": {"reference"}}


def fingerprint(full: bool, only: str | None) -> str:
    """sha256 of the Triton version, the mode and the sources that plan and define the
    kernels (the modules of ``KERNEL_SOURCES`` and this file)."""
    import hashlib

    import triton

    pkg = Path(__file__).resolve().parent.parent
    files = sorted((pkg / KERNEL_SOURCES).rglob("*.py")) + [Path(__file__).resolve()]
    h = hashlib.sha256(f"triton {triton.__version__}; full={full}; only={only}\n".encode())
    for f in files:
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _read_record(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--record {path}: not a JSON record of AOT runs ({exc})")
    if not isinstance(record, dict):
        raise SystemExit(f"--record {path}: expected a JSON object keyed by Triton version")
    return record


def _recorded_run(path: str, key: str, fp: str) -> dict | None:
    run = _read_record(path).get(key)
    return run if isinstance(run, dict) and run.get("fingerprint") == fp else None


def _write_record(path: str, key: str, run: dict) -> None:
    import fcntl

    # CI checks several Tritons at once, each adding its run to the same file
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = _read_record(path)
        record[key] = run
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(sorted(record.items())), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m salt_kernels.tools.aot", description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--triton-venv", action="append", default=[], metavar="DIR",
                   help="run the check with DIR/bin/python instead (repeatable: one venv per Triton version)")
    p.add_argument("--verbose", action="store_true", help="print every compile, not only the problems")
    p.add_argument("--only", metavar="SCENARIO", help="only scenarios whose name starts with this (e.g. contiguous)")
    p.add_argument("--full", action="store_true",
                   help="also odd sizes, transposed at an odd M, transposed U/V, r = 1 and ranks = 8 mod 16 "
                        "(about 1.5 times the compiles)")
    p.add_argument("--warm-cache", metavar="DIR", default=None,
                   help="fill the Triton cache DIR with every kernel the GPU check launches (no GPU needed)")
    p.add_argument("--plan", metavar="FILE", default=None,
                   help="with --warm-cache: the recorded launches (default DIR/plan.jsonl, recorded if absent)")
    p.add_argument("--arch", type=int, action="append", default=None,
                   help=f"with --warm-cache: GPU architecture (repeatable; default {WARM_ARCHS[0]}, e.g. 80 too)")
    p.add_argument("--sources", default=None,
                   help="with --warm-cache: only these steps' launches (comma-separated, e.g. tests)")
    p.add_argument("--record", metavar="FILE", default=None,
                   help="skip the compiles if FILE records a clean run of these exact sources with this Triton; "
                        "record a clean run there (SALT_AOT_FORCE=1 compiles anyway)")
    args = p.parse_args(argv)
    if args.triton_venv:
        return _other_venvs(args.triton_venv, ["--jobs", str(args.jobs)] + (["--verbose"] if args.verbose else [])
                            + (["--full"] if args.full else []) + (["--only", args.only] if args.only else [])
                            + (["--record", os.path.abspath(args.record)] if args.record else []))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "salt_kernels.tools.aot", *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    if args.warm_cache:
        return warm_cache(args.warm_cache, args.plan, tuple(args.arch or WARM_ARCHS),
                          args.sources.split(",") if args.sources else None, args.jobs)
    import triton

    key = f"triton {triton.__version__}" + (" --full" if args.full else "") + (f" --only {args.only}" if args.only else "")
    fp = fingerprint(args.full, args.only) if args.record else None
    recorded = _recorded_run(args.record, key, fp) if args.record else None
    if recorded and os.environ.get("SALT_AOT_FORCE", "0") in ("", "0"):
        print(f"salt_kernels AOT: triton {triton.__version__}: these sources (sha256 {fp[:12]}) compiled clean on "
              f"{recorded['date']} ({recorded['specialisations']} specialisations; recorded in {args.record}); "
              f"not compiled again (SALT_AOT_FORCE=1 does)")
        for line in recorded["summary"]:
            print(line)
        print(f"AOT (triton {triton.__version__}): OK (recorded)")
        return 0
    t0 = time.time()
    todo = _JOBS[:] = jobs(args.full, args.only)
    t_plan = time.time() - t0
    # A fresh, private cache so that ptxas really runs (its -v log is what we read).
    with tempfile.TemporaryDirectory(prefix="salt_aot_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = []
        print(f"salt_kernels AOT: triton {triton.__version__}: compiling {len(todo)} specialisations with "
              f"{max(1, args.jobs)} job(s) ...", flush=True)
        step = max(1, len(todo) // 10)  # a progress line per tenth: a full run takes minutes
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for row in pool.map(compile_index, range(len(todo)), chunksize=1):
                rows.append(row)
                for msg in check([row]):  # as they come: a long run shows its problems early
                    print("FAIL", msg, flush=True)
                if len(rows) % step == 0 and len(rows) < len(todo):
                    print(f"  {len(rows)}/{len(todo)} compiled ({time.time() - t0:.0f} s)", flush=True)
    print(f"salt_kernels AOT: triton {triton.__version__}, {len(rows)} specialisations (planned in {t_plan:.0f} s) "
          f"compiled in {time.time() - t0:.0f} s (ptxas: {_ptxas()})")
    problems = check(rows)
    if args.verbose:
        for r in rows:
            tail = f"ERROR {r['error']}" if r["error"] else f"regs {r['regs']:3d} spill {r['spill']:3d} smem {r['smem']:6d}"
            print(f"{_name(r)}: {tail}  [{', '.join(r['scenarios'])}]")
    ok_rows = [r for r in rows if not r["error"]]
    summary = []
    for arch in ARCHS:
        sel = [r for r in ok_rows if r["arch"] == arch]
        if sel:
            summary.append(f"sm_{arch}: {len(sel)} compiled, max registers {max(r['regs'] for r in sel)} "
                           f"(limit {MAX_REGISTERS}), max shared memory {max(r['smem'] for r in sel)} B "
                           f"(limit {SMEM_LIMIT[arch]}), spilling {sum(1 for r in sel if r['spill'])}")
    print("\n".join(summary))
    print(f"AOT (triton {triton.__version__}): OK" if not problems else f"AOT (triton {triton.__version__}): {len(problems)} problem(s)")
    if args.record and not problems:
        _write_record(args.record, key, dict(fingerprint=fp, date=time.strftime("%Y-%m-%d"),
                                             specialisations=len(rows), seconds=round(time.time() - t0),
                                             summary=summary))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
