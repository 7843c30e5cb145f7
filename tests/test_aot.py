"""python -m salt_kernels.tools.aot compiles what runs: the specialisations come from the
launcher's own launch records (backends.triton.kernels.forward_launches / backward_launches)
through Triton's JIT binder, so precision constexprs, stride-1 constants and
divisibility-16 hints are those of a real launch. The full check (every specialisation,
sm_80 and sm_90, on every supported Triton) is `.ci/aot_triton_versions.sh`, which CI
runs after the test suite; here: the derivation, the headroom rule and a sample compile.

These run in a subprocess without TRITON_INTERPRET (interpreted kernels do not compile,
and the interpreter changes the precision constexprs)."""

import json
import os
import subprocess
import sys

import pytest

from salt_kernels.tools import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiled_mode(code: str, timeout=900) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


SPEC = r"""
import json, torch, triton
from salt_kernels.tools import aot
from salt_kernels.backends.triton import kernels as tk

triton.knobs.language.default_fp_fusion = False  # Triton 3.10's default: the launches must not depend on it

def spec(launch, arch=90):
    sig, consts, attrs, opts = aot.specialization(launch, launch.configs[0], arch)
    names = launch.fn.arg_names
    div16 = sorted(names[i[0]] for i, a in attrs.items() if a and ["tt.divisibility", 16] in a)
    ones = sorted(n for n in names if sig[n] == "constexpr" and n not in launch.kwargs and n not in launch.configs[0].kwargs)
    return dict(ones=ones, div16=div16, consts={k[0] if isinstance(k, tuple) else k: v for k, v in consts.items()
                                               if isinstance(v, (str, bool, int))}, names=names,
                warps=opts.num_warps, stages=opts.num_stages, fp_fusion=opts.enable_fp_fusion)

res = {}
for layout in ("contiguous", "transposed", "strided"):
    x, G, U, V, C, b = aot._tensors(torch, 64, 512, 512, 100, torch.float32, layout)
    _, Z, fwd = tk.forward_launches(x, U, V, C, b)
    res[layout] = {L.name: spec(L) for L in fwd}
    *_, bwd = tk.backward_launches(G, Z, U, V, C, True, True, True)
    res[layout + ".bwd"] = {L.name: spec(L) for L in bwd}
print(json.dumps(res, default=str))
"""


@pytest.fixture(scope="module")
def specs():
    return _compiled_mode(SPEC)


def _const(spec, name):
    return spec["consts"][str(spec["names"].index(name))]


def test_precision_is_the_runtime_one(specs):
    """fp32 inputs: the shrink, expand and mix compile with tf32x3, as they run."""
    fwd = specs["contiguous"]
    assert _const(fwd["shrink"], "PRECISION") == "tf32x3"
    assert _const(fwd["expand"], "PRECISION") == "tf32x3"
    assert _const(fwd["mix"], "PRECISION") == "tf32x3"  # (the old check compiled "ieee")
    assert _const(fwd["expand"], "UPCAST_DOT") is False


def test_fp_fusion_is_on_whatever_the_default(specs):
    """Every launch asks for FP fusion (the AOT check compiles what runs), also with
    Triton's default turned off as Triton 3.10 does."""
    assert all(spec["fp_fusion"] is True for launches in specs.values() for spec in launches.values())


def test_stride_one_and_divisibility_follow_the_inputs(specs):
    """Contiguous x: its column stride is the constant 1 and its row stride (512) carries
    the divisibility-16 hint; transposed x swaps them; every other column (stride 2)
    is a plain integer. Sizes are never specialised (one kernel for every M)."""
    c, t, s = specs["contiguous"]["shrink"], specs["transposed"]["shrink"], specs["strided"]["shrink"]
    assert "stride_an" in c["ones"] and "stride_am" in c["div16"]
    assert "stride_am" in t["ones"] and "stride_an" in t["div16"]  # M = 64
    assert "stride_an" not in s["ones"] + s["div16"] and "stride_am" in s["div16"]
    for spec in (c, t, s):
        assert "stride_br" in spec["ones"]  # V (K, r) contiguous
        assert not {"M", "N", "R", "n_per_split", "M_BUCKET", "N_BUCKET"} & set(spec["ones"] + spec["div16"])
        assert {"a_ptr", "b_ptr", "out_ptr"} <= set(spec["div16"])  # 16-byte aligned allocations
    assert "stride_on" in specs["contiguous"]["expand"]["ones"]
    assert "stride_am" in specs["transposed.bwd"]["shrink"]["ones"]  # G transposed too


def test_headroom_and_spills_fail_the_check():
    row = dict(kernel="shrink", flags="", R_PAD=64, BM=64, BN=64, warps=4, stages=3, dtype="bfloat16",
               arch=90, regs=200, spill=0, smem=1000, error=None)
    assert aot.check([row]) == []
    assert "registers" in aot.check([dict(row, regs=aot.MAX_REGISTERS + 1)])[0]
    assert "spills" in aot.check([dict(row, spill=8)])[0]
    assert "shared memory" in aot.check([dict(row, smem=10**6)])[0]
    assert "compile failed" in aot.check([dict(row, error="boom")])[0]


def test_every_scenario_plans_launches():
    """The check covers contiguous, transposed, every-other-column and stride-0 inputs,
    decode and large M, every padded rank, and every combination of needed gradients."""
    names = {n for n, *_ in aot._scenarios()}
    assert {"transposed M64", "strided", "stride0"} <= names and any(n.startswith("contiguous") for n in names)
    assert len(aot.R_PADS) == 5 and len(aot.NEEDS) == 4


def test_every_padded_rank_is_checked_at_an_odd_rank():
    """Rank strides (U/V rows, Z, the core, the partials) are specialised on r: each
    padded rank is checked at r = R_PAD (all 16-aligned) and at an odd rank in its bucket
    (none aligned); --full adds r = 1 (strides == 1) and ranks that are multiples of 8 only."""
    from salt_kernels.backends.triton import kernels as tk

    for full in (False, True):
        rs = aot.ranks(full)
        for R_PAD in aot.R_PADS:
            bucket = [r for r in rs if tk.rank_tiles(r)[0] == R_PAD]
            assert R_PAD in bucket and any(r % 2 for r in bucket), (R_PAD, bucket)
    assert {1, 24, 136} <= set(aot.ranks(True)) - set(aot.ranks())
    planned = {(L.name, dict(zip(L.fn.arg_names, L.args))["R_ALIGNED"]) for _, L in aot.launches()
               if L.name in ("shrink", "expand")}
    assert {("shrink", 0), ("shrink", 1), ("expand", 0), ("expand", 1)} <= planned  # R_ALIGNED both ways


def test_sample_compiles_without_spills():
    """A sample of the check, compiled for real: the widest fp32 forward at large M."""
    rows = _compiled_mode(r"""
import json
from salt_kernels.tools import aot
jobs = [j for j in aot.jobs() if j["launch"].kwargs.get("R_PAD") == 256 and j["arch"] == 90
        and "contiguous M4096 r256" in j["scenarios"] and str(j["launch"].args[0].dtype) == "torch.float32"
        and j["launch"].name in ("expand", "mix")][:4]
print(json.dumps([aot.compile_one(j) for j in jobs], default=str))
""")
    assert rows
    assert aot.check(rows) == [], aot.check(rows)


def test_odd_rank_launches_compile_without_spills():
    """Odd ranks (rank strides without the divisibility-16 hint) take their own configs:
    the fp32 backward mix with dC and dZ (32 B spilled on sm_90 at 4 warps), the bf16
    expand at r > 64 (255 registers or spills at 128-column tiles) and the fp32 expand
    (spilled at 32 rows) compile clean at r = 33, 200 and 9, as planned for a real launch."""
    rows = _compiled_mode(r"""
import json, torch
from salt_kernels.tools import aot
from salt_kernels.backends.triton import kernels as tk
jobs = []
for r, dtype, M, name, arch in ((33, torch.float32, 32, "mix", 90), (200, torch.float32, 4096, "mix", 90),
                                (129, torch.bfloat16, 32, "expand", 80), (9, torch.float32, 32, "expand", 90)):
    x, G, U, V, C, b = aot._tensors(torch, M, 512, 512, r, dtype, "contiguous")
    _, Z, _ = tk.forward_launches(x, U, V, C, b)
    *_, bwd = tk.backward_launches(G, Z, U, V, C, True, True, True)
    jobs += [dict(launch=L, config=c, arch=arch, scenarios=[f"r{r}"]) for L in bwd if L.name == name for c in L.configs]
print(json.dumps([aot.compile_one(j) for j in jobs], default=str))
""")
    assert len(rows) == 5
    assert aot.check(rows) == [], aot.check(rows)


def test_multi_adapter_expand_is_checked():
    """The mixed-adapter Triton forward's expand is enumerated from its own launcher
    (backends.triton.multi.multi_launches) at every padded rank it serves and every bias mode."""
    from salt_kernels.backends.triton import multi as tm

    seen = {(aot._io_dtype(L), L.kwargs["R_PAD"], L.kwargs["HAS_BIAS"], L.kwargs["BANKED_BIAS"],
             L.kwargs["HAS_BASE_BIAS"]) for _, L in aot.multi_launches() if L.fn is tm._multi_expand_kernel}
    odd = {L.args[1] % 16 != 0 for _, L in aot.multi_launches() if L.fn is tm._multi_expand_kernel}
    assert odd == {True, False}  # Z's row stride r: odd ranks too
    modes = {(False, False, False), (True, False, False), (True, True, False), (True, True, True)}
    want = {(d, R, *m) for d, ranks in (("bfloat16", (16, 32, 64, 128)), ("float32", (16, 32, 64))) for R in ranks for m in modes}
    assert seen == want


@pytest.mark.slow  # minutes of compiles: CI's slow-tests job
def test_every_launch_compiles_on_the_installed_triton():
    """python -m salt_kernels.tools.aot --full on the Triton this environment has: every launch
    the host can plan (odd sizes and transposed bases included) compiles for sm_80 and
    sm_90 with no spills, at most MAX_REGISTERS registers and shared memory within the
    limit (no GPU needed). A process without TRITON_INTERPRET: interpreted kernels cannot
    compile. The other supported Triton versions: bash .ci/aot_triton_versions.sh."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    # --record: compiles only if the kernel sources changed since the recorded clean run
    # with this Triton (test_record_* below checks that the record is keyed right).
    out = subprocess.run([sys.executable, "-m", "salt_kernels.tools.aot", "--full", "--jobs", "2",
                          "--record", os.path.join(root, ".ci", "aot-verified.json")], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "): OK" in out.stdout and "sm_80:" in out.stdout and "sm_90:" in out.stdout


# ----------------------------------------------- --record: clean runs keyed by their inputs

def _package_copy(tmp_path):
    """backends/ and tools/aot.py of this package, copied (the fingerprint reads part of them)."""
    import shutil
    from pathlib import Path

    pkg = Path(aot.__file__).resolve().parent.parent
    dst = tmp_path / "salt_kernels"
    shutil.copytree(pkg / "backends", dst / "backends", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (dst / "tools").mkdir()
    shutil.copy(pkg / "tools" / "aot.py", dst / "tools" / "aot.py")
    return dst


def test_record_fingerprint_follows_the_kernel_sources_triton_and_mode(tmp_path, monkeypatch):
    import triton

    dst = _package_copy(tmp_path)
    monkeypatch.setattr(aot, "__file__", str(dst / "tools" / "aot.py"))
    base = aot.fingerprint(True, None)
    assert aot.fingerprint(True, None) == base
    (dst / "nn").mkdir()
    (dst / "nn" / "layer.py").write_text("x = 1\n")  # outside what compiles: no effect
    assert aot.fingerprint(True, None) == base
    eager = dst / "backends" / "autograd.py"  # the host path around the kernels: no effect either
    eager.write_text(eager.read_text() + "\n# a change\n")
    assert aot.fingerprint(True, None) == base
    assert aot.fingerprint(False, None) != base and aot.fingerprint(True, "contiguous") != base
    kernels = dst / "backends" / "triton" / "kernels.py"
    kernels.write_text(kernels.read_text() + "\n# a change\n")
    changed = aot.fingerprint(True, None)
    assert changed != base
    (dst / "tools" / "aot.py").write_text((dst / "tools" / "aot.py").read_text() + "\n")
    assert aot.fingerprint(True, None) not in (base, changed)
    monkeypatch.setattr(triton, "__version__", "0.0.0")
    assert aot.fingerprint(True, None) != base


def test_kernel_sources_import_only_the_host_glue_from_the_package():
    """The fingerprint reads the Triton backend's modules only. Anything else of the package
    they import could change a launch plan without changing the fingerprint: a new such
    import fails here, to be added to aot.EAGER_IMPORTS (it does not plan) or to the
    fingerprinted sources (it does)."""
    import ast
    from pathlib import Path

    root = Path(aot.__file__).resolve().parent.parent / aot.KERNEL_SOURCES
    files = sorted(root.rglob("*.py"))
    assert {f.name for f in files} >= {"kernels.py", "multi.py"}
    outside = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                key = "." * node.level + (node.module or "")
                outside.setdefault(key, set()).update(a.name for a in node.names)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "salt_kernels" for n in names), f"{f.name}: {names}"
    assert outside == aot.EAGER_IMPORTS


def test_record_skips_the_compiles_only_for_the_recorded_sources(tmp_path, monkeypatch, capsys):
    """A clean run recorded with this fingerprint: nothing is planned or compiled. Another
    fingerprint, or SALT_AOT_FORCE=1: the check runs and records its clean result."""
    import triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    record = tmp_path / "record.json"
    key = f"triton {triton.__version__} --full"
    summary = ["sm_80: 3 compiled, max registers 100 (limit 240), max shared memory 0 B (limit 1), spilling 0"]
    record.write_text(json.dumps({key: dict(fingerprint=aot.fingerprint(True, None), date="2026-12-05",
                                            specialisations=3, seconds=1, summary=summary)}))
    planned = []
    monkeypatch.setattr(aot, "jobs", lambda full, only: planned.append(full) or [])
    assert aot.main(["--full", "--record", str(record)]) == 0
    out = capsys.readouterr().out
    assert planned == [] and "not compiled again" in out and summary[0] in out and "OK (recorded)" in out

    monkeypatch.setenv("SALT_AOT_FORCE", "1")
    assert aot.main(["--full", "--record", str(record)]) == 0
    assert planned == [True]
    monkeypatch.delenv("SALT_AOT_FORCE")

    stale = json.loads(record.read_text())
    stale[key]["fingerprint"] = "0" * 64  # other sources
    record.write_text(json.dumps(stale))
    assert aot.main(["--full", "--record", str(record)]) == 0
    assert planned == [True, True]
    run = json.loads(record.read_text())[key]
    assert run["fingerprint"] == aot.fingerprint(True, None) and run["specialisations"] == 0


def test_record_that_is_not_a_record_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bad = tmp_path / "record.json"
    bad.write_text("[1, 2")
    with pytest.raises(SystemExit, match="record.json: not a JSON record"):
        aot.main(["--record", str(bad)])
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="expected a JSON object"):
        aot.main(["--record", str(bad)])


def test_ci_keeps_a_record_for_every_supported_triton():
    """.ci/aot-verified.json: a clean --full run per Triton CI checks; when the kernel
    sources change, CI compiles again (the record no longer matches) until it is renewed
    with bash .ci/aot_triton_versions.sh --full --record .ci/aot-verified.json."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci", "aot-verified.json")
    record = json.load(open(path))
    assert {"triton 3.6.0 --full", "triton 3.8.0 --full", "triton 3.9.0 --full"} <= set(record)
    for run in record.values():
        assert len(run["fingerprint"]) == 64 and run["specialisations"] > 0
        assert any(line.startswith("sm_90:") and line.endswith("spilling 0") for line in run["summary"])
