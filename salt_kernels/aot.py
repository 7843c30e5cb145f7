"""``python -m salt_kernels.aot``: compile every Triton kernel ahead of time, no GPU needed.

Each kernel variant the launcher can produce (the constexpr mode flags of
``_shrink_kernel`` / ``_expand_kernel``), at every autotune config that survives the
launcher's pruning, for fp32 and bf16 (fp16 has bf16's tile sizes and code shape),
at the padded ranks and row tiles the host picks, is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for sm_80 and
sm_90. Registers and spills come from the ``ptxas`` shipped in the triton wheel
(``ptxas -v`` on the generated PTX), shared memory from the compiled metadata.

Prints one row per compile and exits non-zero if any compile fails, spills, or needs
more shared memory than the architecture allows (DESIGN.md section 5).

Must run without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` functions
are not compilable); if the variable is set, this re-runs itself without it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block
ARCHS = (80, 90)
DTYPES = ("fp32", "bf16")

# (kernel, variant, mix placement, mode constexprs) -- exactly the combinations
# salt_forward / salt_backward launch (see triton_kernels.py). Placement: "prologue"
# variants run only where the host puts the mix in the expand prologue, "separate" ones
# (the mix kernel and the plain expand) only where it does not, "any" always.
_SHRINK = dict(NEED_ACC=True, COLSUM=False)
_MIX = dict(STORE_Z=False, DC=False, STORE_MIX=True)
_EXPAND = dict(PROLOGUE_MIX=False, STORE_Z=False, DC=False, COMPUTE_OUT=True, HAS_BIAS=False)
VARIANTS = [
    ("shrink", "fwd", "any", dict(_SHRINK)),
    ("shrink", "bwd", "any", {**_SHRINK, "COLSUM": True}),
    ("shrink", "bwd.db_only", "any", {**_SHRINK, "NEED_ACC": False, "COLSUM": True}),
    ("mix", "fwd", "separate", {**_MIX, "STORE_Z": True}),
    ("mix", "bwd", "separate", {**_MIX, "DC": True}),
    ("mix", "bwd.dc_only", "separate", {**_MIX, "DC": True, "STORE_MIX": False}),
    ("expand", "fwd.prologue", "prologue", {**_EXPAND, "PROLOGUE_MIX": True, "STORE_Z": True, "HAS_BIAS": True}),
    ("expand", "bwd.prologue", "prologue", {**_EXPAND, "PROLOGUE_MIX": True, "DC": True}),
    ("expand", "bwd.dc_only", "prologue", {**_EXPAND, "PROLOGUE_MIX": True, "DC": True, "COMPUTE_OUT": False}),
    ("expand", "fwd.plain", "separate", {**_EXPAND, "HAS_BIAS": True}),
    ("expand", "bwd.plain", "separate", dict(_EXPAND)),
]
# Every padded rank the host can pick (rank_tiles: powers of two from 16 to MAX_RANK),
# and token counts covering every row tile block_m can return (decode to large M).
R_PADS = (16, 32, 64, 128, 256)
_TOKEN_COUNTS = (1, 16, 32, 64, 1 << 20)


def _jobs():
    """Every (kernel variant, padded rank, row tile, dtype, autotune config, arch) the
    launcher can produce."""
    from .backends import triton_kernels as tk

    jobs = []
    for kernel, variant, placement, modes in VARIANTS:
        for dtype in DTYPES:
            elem = 4 if dtype == "fp32" else 2
            ranks = R_PADS[:1] if variant == "bwd.db_only" else R_PADS  # no r-wide work at all
            for R_PAD in ranks:
                prologue = tk._mix_in_prologue(R_PAD, tk.rank_tiles(R_PAD)[1], elem)
                if placement != "any" and prologue != (placement == "prologue"):
                    continue  # the host never launches this variant at this rank and dtype
                if kernel == "mix":  # not autotuned: one fixed tile and launch config
                    tiles = [(tk.MIX_BM, None, tk.mix_warps(R_PAD), 1)]
                    job_modes = dict(modes, BR=min(tk.MIX_BR, R_PAD))
                else:
                    job_modes = modes
                    bms = sorted({tk.block_m(M, R_PAD, elem) for M in _TOKEN_COUNTS})
                    tiles = [(BM, c.kwargs["BN"], c.num_warps, c.num_stages) for BM in bms
                             for c in tk.usable_configs(kernel, BM, R_PAD, elem)]
                for BM, BN, warps, stages in tiles:
                    for arch in ARCHS:
                        jobs.append((kernel, variant, job_modes, R_PAD, BM, dtype, BN, warps, stages, arch))
    return jobs


_IO_PTRS = {"shrink": {"a_ptr", "b_ptr"}, "mix": set(), "expand": {"b_ptr", "bias_ptr", "out_ptr"}}


def _signature(kernel: str, dtype: str, constexprs: dict):
    """Types for every argument: pointers to the input dtype (x/G, U/V, bias, y/dx) or to
    fp32 (our partial and r-wide buffers), 32-bit sizes and strides (the common runtime
    specialisation; offsets are widened to int64 inside the kernels), constexprs as such.
    Pointers carry the 16-byte alignment hint torch allocations get at runtime."""
    from .backends import triton_kernels as tk

    fn = {"shrink": tk._shrink_kernel, "mix": tk._mix_kernel, "expand": tk._expand_kernel}[kernel]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in _IO_PTRS[kernel] else "*fp32"
        else:
            sig[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
    return fn, sig, attrs


def compile_one(job):
    """Compile one (kernel, variant, tile, dtype, config, arch); return a result row."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .backends import triton_kernels as tk

    kernel, variant, modes, R_PAD, BM, dtype, BN, warps, stages, arch = job
    mix_precision = "ieee" if dtype == "fp32" else "tf32"  # as triton_kernels._mix_precision
    constexprs = dict(modes, BM=BM, R_PAD=R_PAD,
                      PRECISION=mix_precision if kernel == "mix" else tk.FP32_PRECISION)
    if kernel != "shrink":
        constexprs.setdefault("BR", min(R_PAD, 64))
    if kernel != "mix":
        constexprs.update(BN=BN, UPCAST_DOT=False)
    if kernel == "expand":
        constexprs["MIX_PRECISION"] = mix_precision
    row = dict(kernel=kernel, variant=variant, R_PAD=R_PAD, BM=BM, BN=BN or 0, warps=warps, stages=stages,
               dtype=dtype, arch=arch, regs=None, spill=None, smem=None, error=None)
    t0 = time.time()
    try:
        fn, sig, attrs = _signature(kernel, dtype, constexprs)
        src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
        # Triton runs the wheel's ptxas with -v itself; keep its log instead of a second run.
        triton.knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": warps, "num_stages": stages})
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


def check(rows) -> list[str]:
    problems = []
    for r in rows:
        name = f"{r['kernel']}.{r['variant']} R{r['R_PAD']} BM{r['BM']} BN{r['BN']} w{r['warps']} s{r['stages']} {r['dtype']} sm_{r['arch']}"
        if r["error"]:
            problems.append(f"{name}: compile failed: {r['error']}")
        elif r["spill"]:
            problems.append(f"{name}: spills {r['spill']} bytes")
        elif r["smem"] > SMEM_LIMIT[r["arch"]]:
            problems.append(f"{name}: shared memory {r['smem']} > {SMEM_LIMIT[r['arch']]}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m salt_kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "salt_kernels.aot", *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    import triton

    jobs = _jobs()
    t0 = time.time()
    # A fresh, private cache so that ptxas really runs (its -v log is what we read).
    with tempfile.TemporaryDirectory(prefix="salt_aot_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            rows = list(pool.map(compile_one, jobs, chunksize=1))
    print(f"salt_kernels AOT: triton {triton.__version__}, {len(rows)} compiles in {time.time() - t0:.0f} s "
          f"(ptxas: {_ptxas()})")
    hdr = f"{'kernel':8s} {'variant':13s} {'R_PAD':>5s} {'BM':>3s} {'BN':>3s} {'warps':>5s} {'stages':>6s} {'dtype':5s} {'arch':6s} {'regs':>4s} {'spill':>5s} {'smem':>7s}"
    print(hdr)
    for r in rows:
        if r["error"]:
            tail = f"ERROR {r['error']}"
        else:
            tail = f"{r['regs']:4d} {r['spill']:5d} {r['smem']:7d}"
        print(f"{r['kernel']:8s} {r['variant']:13s} {r['R_PAD']:5d} {r['BM']:3d} {r['BN']:3d} {r['warps']:5d} "
              f"{r['stages']:6d} {r['dtype']:5s} sm_{r['arch']:<3d} {tail}")
    ok_rows = [r for r in rows if not r["error"]]
    for arch in ARCHS:
        sel = [r for r in ok_rows if r["arch"] == arch]
        if sel:
            print(f"sm_{arch}: {len(sel)} compiled, max registers {max(r['regs'] for r in sel)}, "
                  f"max shared memory {max(r['smem'] for r in sel)} B (limit {SMEM_LIMIT[arch]}), "
                  f"spilling {sum(1 for r in sel if r['spill'])}")
    problems = check(rows)
    for msg in problems:
        print("FAIL", msg)
    print("AOT: OK" if not problems else f"AOT: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
