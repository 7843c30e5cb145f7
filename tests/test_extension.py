"""The C++/CUDA extension (backends "cpu" and "cuda", salt_kernels/backends/extension/).

Numerics of salt_linear on these backends (every shape, dtype and gradient vs float64)
are in test_salt_linear.py; here: the ops themselves (opcheck), gradcheck, bitwise
determinism, the large-output path, fallback when the extension is missing, and the
CUDA part (device code compiled by plain nvcc, kernels registered, numerics on a GPU).
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import salt_kernels
from salt_kernels.ops.dispatch import resolve_backend, unavailable_reason
from salt_testing import TOLERANCES, assert_matches_ground_truth, ground_truth, make_salt_inputs, max_rel_err

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()


def _ext_or_skip():
    try:
        from salt_kernels.backends.extension import ops as extension
    except ImportError as exc:
        pytest.skip(f"extension not built: {exc}")
    return extension


def _require(backend, device):
    reason = unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(f"backend '{backend}' unavailable on {device}: {reason}")


def _op_inputs(M, K, D, r, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(M, K, generator=g).to(device, dtype)
    U = (torch.randn(D, r, generator=g) * D ** -0.5).to(device, dtype)
    V = (torch.randn(K, r, generator=g) * K ** -0.5).to(device, dtype)
    C = torch.randn(r, r, generator=g).to(device, acc)
    b = torch.randn(D, generator=g).to(device, dtype) if bias else None
    return x, U, V, C, b


# --------------------------------------------------------------------------- CPU backend

def test_auto_picks_cpu_backend_when_built():
    _require("cpu", "cpu")
    assert salt_kernels.available_backends("cpu")[0] == "cpu"
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(device, dtype, bias):
    _require(device, device)
    ext = _ext_or_skip()
    x, U, V, C, b = _op_inputs(37, 19, 23, 6, dtype, device, bias)
    torch.library.opcheck(ext.salt_forward, (x.requires_grad_(), U, V, C.requires_grad_(), b))
    y, Z = ext.salt_forward(x.detach(), U, V, C.detach(), b)
    G = torch.randn_like(y)
    for flags in [(True, True, True), (False, True, False), (True, False, bias)]:
        torch.library.opcheck(ext.salt_backward, (G, Z, U, V, C.detach(), *flags))
    # stride-0 upstream gradient, as y.sum() produces
    torch.library.opcheck(ext.salt_backward, (torch.ones(1, 1, dtype=dtype, device=device).expand_as(y),
                                              Z, U, V, C.detach(), True, True, True))


_CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


@pytest.mark.parametrize("moved", ["U", "V", "C", "bias"])
def test_forward_rejects_mixed_devices(moved):
    """Every tensor argument must be on x's device; the error names the argument. The CPU
    kernel is called directly (redispatch) with one meta tensor, as a CUDA kernel would
    be with a CPU tensor among CUDA ones; the fake (meta) kernel checks the same."""
    _require("cpu", "cpu")
    ext = _ext_or_skip()
    args = dict(zip(["x", "U", "V", "C", "bias"], _op_inputs(5, 7, 6, 3, torch.float32, "cpu")))
    args[moved] = args[moved].to("meta")
    msg = f"salt_forward: {moved} is on meta but x is on cpu; all tensor arguments must be on one device"
    with pytest.raises(RuntimeError, match=msg):
        ext.salt_forward.redispatch(_CPU_KERNEL, *args.values())
    with pytest.raises(RuntimeError, match=msg):
        ext.salt_forward(*args.values())  # dispatches to the fake kernel


@pytest.mark.parametrize("moved", ["Z", "U", "V", "C"])
def test_backward_rejects_mixed_devices(moved):
    _require("cpu", "cpu")
    ext = _ext_or_skip()
    x, U, V, C, b = _op_inputs(5, 7, 6, 3, torch.float32, "cpu")
    y, Z = ext.salt_forward(x, U, V, C, b)
    args = dict(G=torch.randn_like(y), Z=Z, U=U, V=V, C=C)
    args[moved] = args[moved].to("meta")
    msg = f"salt_backward: {moved} is on meta but G is on cpu; all tensor arguments must be on one device"
    with pytest.raises(RuntimeError, match=msg):
        ext.salt_backward.redispatch(_CPU_KERNEL, *args.values(), True, True, True)
    with pytest.raises(RuntimeError, match=msg):
        ext.salt_backward(*args.values(), True, True, True)


def test_gradcheck_float64_leading_dims_noncontiguous():
    _require("cpu", "cpu")
    t = make_salt_inputs((2, 3), 9, 7, 4, 2, torch.float64, grad_basis=True)
    t["x"] = t["x"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    names = ["x", "U", "V", "sigma", "X", "Y", "bias"]

    def f(*args):
        return salt_kernels.salt_linear(*args, scaling=0.5, backend="cpu")

    assert torch.autograd.gradcheck(f, tuple(t[n] for n in names))


def test_torch_compile_fullgraph_traces_the_ops():
    """The fake kernels and registered autograd let torch.compile(fullgraph=True) trace
    forward and backward through the extension ops."""
    _require("cpu", "cpu")
    ext = _ext_or_skip()
    names = ["x", "U", "V", "sigma", "X", "Y", "bias"]
    t = make_salt_inputs((20,), 16, 12, 4, 2, torch.float32)
    compiled = torch.compile(lambda *a: ext.salt_linear_2d(*a, 0.5), fullgraph=True)
    y = compiled(*(t[n] for n in names))
    grads = torch.autograd.grad(y.sum(), [t[n] for n in ("x", "sigma", "X", "Y", "bias")])
    y_ref = salt_kernels.salt_linear(**t, scaling=0.5, backend="reference")
    grads_ref = torch.autograd.grad(y_ref.sum(), [t[n] for n in ("x", "sigma", "X", "Y", "bias")])
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol)


def _grads(dtype, threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = make_salt_inputs((2500,), 48, 40, 8, 3, dtype, seed=3)  # several row blocks and dC slices
        y = salt_kernels.salt_linear(**t, backend="cpu")
        names = ["x", "sigma", "X", "Y", "bias"]
        return [y.detach()] + list(torch.autograd.grad(y, [t[n] for n in names], torch.ones_like(y)))
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_bitwise_deterministic(dtype):
    """Same inputs -> bitwise-identical forward and gradients run to run; and the
    reductions over M that the kernel does itself (dsigma, dX, dY via dC, and db: fixed
    row blocks summed in order) whatever the thread count, odd splits included. y and dx
    are per-row GEMM products left to MKL, whose kernels can change with the thread
    count (y moved by 1 ulp at 3 threads), so they are compared at one thread count."""
    _require("cpu", "cpu")
    first = _grads(dtype, torch.get_num_threads())
    again = _grads(dtype, torch.get_num_threads())
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for threads in (1, 2, 3):  # 3: an uneven split, even on 2 cores
        again = _grads(dtype, threads)
        for a, b in zip(first[2:], again[2:]):  # [y, dx, dsigma, dX, dY, db]
            assert torch.equal(a, b), f"{threads} threads"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [300, 5], ids=["fold", "per-block"])
def test_column_major_upstream_gradient(dtype, M):
    """A column-major G (the gradient of a transposed use of y) is read in place: the db
    column sums walk it with a row stride of 1, the GEMMs take it transposed."""
    _require("cpu", "cpu")
    t = make_salt_inputs((M,), 45, 29, 12, 3, dtype, seed=6)
    y = salt_kernels.salt_linear(**t, backend="cpu")
    g = torch.randn(29, M, dtype=torch.float64).to(dtype).t()  # (M, D), strides (1, M)
    assert g.stride() == (1, M)
    _, grads_ref = ground_truth(t, g.double())
    grads = torch.autograd.grad(y, [t[n] for n in grads_ref], g)
    for name, gr in zip(grads_ref, grads):
        err = max_rel_err(gr, grads_ref[name])
        assert err <= TOLERANCES[dtype], f"d{name}: {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_outputs(dtype):
    """Outputs of 32 MiB and more are allocated on huge pages: check values and that they
    behave as ordinary tensors (y: 2048 x 4096 fp32 = 32 MiB; dx likewise)."""
    _require("cpu", "cpu")
    M, r = 2048, 4
    K = D = 4096 if dtype == torch.float32 else 8192  # 32 MiB for y and dx
    t = make_salt_inputs((M,), K, D, r, 2, dtype)
    y = salt_kernels.salt_linear(**t, backend="cpu")
    G = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dx, dsigma, db = torch.autograd.grad(y, [t["x"], t["sigma"], t["bias"]], G)
    # float64 ground truth through the chain (the dense formula would be too slow here)
    d = {k: v.detach().double() for k, v in t.items()}
    C = torch.diag(d["sigma"]) + d["X"] @ d["Y"]
    Z = d["x"] @ d["V"]
    y64 = Z @ C.t() @ d["U"].t() + d["bias"]
    dT = G.double() @ d["U"]
    tol = TOLERANCES[dtype]
    for got, want in [(y, y64), (dx, dT @ C @ d["V"].t()), (dsigma, (dT * Z).sum(0)), (db, G.double().sum(0))]:
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= tol, err
    y2 = y.detach().clone()
    y2.mul_(2)  # huge-page storage is an ordinary, writable tensor
    assert torch.equal(y2, y.detach() * 2)
    assert y.detach().numpy().shape == (M, D) and dx.dtype == dtype


def test_missing_extension_falls_back_with_one_warning():
    """With salt_kernels._C unloadable, the package imports, available_backends tells the
    truth, auto falls back with exactly one warning and backend='cpu' raises saying why."""
    code = textwrap.dedent("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "salt_kernels._C":
                    raise ImportError("simulated: extension not built")
        sys.meta_path.insert(0, Block())
        import torch, salt_kernels
        from salt_kernels import BackendUnavailableError
        assert salt_kernels.available_backends("cpu")[0] == "reference", salt_kernels.available_backends("cpu")
        assert "cpu" not in salt_kernels.available_backends("cpu")
        # above the CPU policy's first row, where auto would not try the extension
        M = salt_kernels.ops.dispatch.AUTO_POLICY["cpu"][0][0] + 1
        x, U, V, s = torch.randn(M, 5), torch.randn(4, 2), torch.randn(5, 2), torch.rand(2)
        X, Y = torch.randn(2, 1), torch.randn(1, 2)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for _ in range(3):
                salt_kernels.salt_linear(x, U, V, s, X, Y)
        msgs = [str(m.message) for m in w]
        assert len(msgs) == 1 and "salt_kernels._C" in msgs[0], msgs
        try:
            salt_kernels.salt_linear(x, U, V, s, X, Y, backend="cpu")
        except BackendUnavailableError as e:
            assert "not available" in str(e)
        else:
            raise AssertionError("backend='cpu' should raise")
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


# ------------------------------------------------------------------- build fallbacks

def _fake_tool(path: Path, real: str, fail_when: str) -> Path:
    """A compiler wrapper that fails like a toolchain without a feature would."""
    path.write_text(f"#!/bin/bash\n{fail_when} && {{ echo 'simulated failure' >&2; exit 1; }}\nexec {real} \"$@\"\n")
    path.chmod(0o755)
    return path


def _build_copy(tmp_path, env_extra):
    """Build the extension in place in a copy of the sources; return (log, copy root)."""
    root = tmp_path / "src"
    for name in ("csrc", "salt_kernels"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, root / name)
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr, root


_CHECK_BUILT = textwrap.dedent("""
    import torch, salt_kernels
    from salt_kernels.backends.extension import ops as ext
    x = torch.randn(3000, 40, requires_grad=True)  # several db/dC blocks
    U, V = torch.randn(30, 8), torch.randn(40, 8)
    s, X, Y = torch.rand(8), torch.randn(8, 2), torch.randn(2, 8)
    y = salt_kernels.salt_linear(x, U, V, s, X, Y, backend="cpu")
    ref = salt_kernels.salt_linear(x, U, V, s, X, Y, backend="reference")
    assert (y - ref).abs().max() <= 2e-5 * ref.abs().max(), (y - ref).abs().max()
    print("cpu", ext.has_kernel("cpu"), "cuda", ext.has_kernel("cuda"))
""")


@pytest.mark.slow  # a whole extension build: CI's slow-tests job
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_build_without_openmp_falls_back(tmp_path):
    """A compiler that rejects -fopenmp still gets a working (single-threaded loops) extension."""
    cxx = _fake_tool(tmp_path / "c++", shutil.which("g++"), '[[ " $* " == *" -fopenmp "* ]]')
    log, root = _build_copy(tmp_path, {"CXX": str(cxx), "CC": str(cxx), "SALT_KERNELS_NO_CUDA": "1"})
    assert "retrying without OpenMP" in log
    out = subprocess.run([sys.executable, "-c", _CHECK_BUILT], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(root)))
    assert out.returncode == 0 and "cpu True" in out.stdout, out.stderr[-3000:]


def test_default_cuda_arch_list_has_ptx():
    """Without TORCH_CUDA_ARCH_LIST the build embeds PTX, so GPUs newer than the listed
    ones (sm_100, sm_120) still get code (the driver JIT-compiles it)."""
    import ast
    tree = ast.parse((ROOT / "setup.py").read_text())
    values = [node.value.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCH_LIST" for t in node.targets)]
    assert len(values) == 1 and values[0].endswith("+PTX") and {"8.0", "9.0"} <= set(
        values[0].replace("+PTX", "").split(";")), values


@pytest.mark.slow  # a whole extension build: CI's slow-tests job
def test_build_with_failing_cuda_falls_back_to_cpu(tmp_path, monkeypatch):
    """A CUDA toolkit whose nvcc fails leaves the CPU extension built and working; the
    nvcc it tried was asked for sm_80, sm_90 and compute_90 PTX by default."""
    if torch.version.cuda is None or _nvcc() is None:
        pytest.skip("needs a CUDA build of torch and nvcc (the CUDA part is not attempted otherwise)")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    for sub in ("include", "lib64"):
        (home / sub).symlink_to(Path(_nvcc()).parents[1] / sub)
    nvcc_args = tmp_path / "nvcc_args"
    _fake_tool(home / "bin" / "nvcc", _nvcc(),
               f'echo "$*" >> {nvcc_args}; [[ "$1" != "--version" && "$1" != "-V" ]]')
    log, root = _build_copy(tmp_path, {"CUDA_HOME": str(home), "SALT_KERNELS_BUILD_CUDA": "1"})
    assert "retrying without the CUDA part" in log
    compile_args = [line for line in nvcc_args.read_text().splitlines() if "salt_cuda.cu" in line]
    assert compile_args, nvcc_args.read_text()
    for code in ("arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"):
        assert code in compile_args[0], compile_args[0]
    out = subprocess.run([sys.executable, "-c", _CHECK_BUILT], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(root)))
    assert out.returncode == 0 and "cpu True cuda False" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------- bf16 GEMMs on the CPU

def _saved_Z(dtype, seed=0):
    ext = _ext_or_skip()
    t = make_salt_inputs((40,), 24, 16, 8, 2, dtype, seed=seed)
    C = torch.diag(t["sigma"].float()) + t["X"].float() @ t["Y"].float()
    _, Z = ext.salt_forward(t["x"].detach(), t["U"], t["V"], C, t["bias"].detach())
    return Z


def test_cpu_gemm_dtype_is_what_runs():
    """cpu_gemm_dtype reports the kernel's choice, seen in the saved Z: bf16-rounded
    values exactly when the large GEMMs run in bf16."""
    _require("cpu", "cpu")
    ext = _ext_or_skip()
    assert ext.cpu_gemm_dtype(torch.float32) == torch.float32
    assert ext.cpu_gemm_dtype(torch.float16) == torch.float32
    assert ext.cpu_gemm_dtype(torch.float64) == torch.float64
    mode = ext.cpu_gemm_dtype(torch.bfloat16)
    assert mode in (torch.bfloat16, torch.float32)
    Z = _saved_Z(torch.bfloat16)
    assert Z.dtype == torch.float32
    assert torch.equal(Z.bfloat16().float(), Z) == (mode == torch.bfloat16)
    assert not torch.equal(_saved_Z(torch.float16).half().float(), _saved_Z(torch.float16))


def test_cpu_bf16_fp32_gemm_path():
    """SALT_KERNELS_CPU_BF16_GEMM=0 forces the fp32 path for bf16 (the default on CPUs
    without bf16 instructions; the rest of the suite runs whichever path this machine
    picks). Checked in a subprocess, since the choice is made once per process:
    forward and every gradient against float64, both mix placements (folded when M > D
    and M > K, per block otherwise), non-contiguous x, stride-0 upstream gradient."""
    _require("cpu", "cpu")
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        import torch, salt_kernels
        from salt_kernels.backends.extension import ops as ext
        from salt_testing import assert_matches_ground_truth, make_salt_inputs
        assert ext.cpu_gemm_dtype(torch.bfloat16) == torch.float32
        fn = lambda **t: salt_kernels.salt_linear(**t, backend="cpu")
        for lead, K, D, r, rl in [((3, 37), 45, 29, 12, 3), ((5,), 45, 29, 12, 3), ((300,), 70, 50, 33, 0)]:
            t = make_salt_inputs(lead, K, D, r, rl, torch.bfloat16, seed=4)
            assert_matches_ground_truth(fn, t, torch.bfloat16)
            assert_matches_ground_truth(fn, t, torch.bfloat16, upstream="sum")
            t["x"] = t["x"].detach().mT.contiguous().mT.requires_grad_()  # column-major x
            assert not t["x"].is_contiguous()
            assert_matches_ground_truth(fn, t, torch.bfloat16)
        print("OK")
    """)
    env = dict(os.environ, SALT_KERNELS_CPU_BF16_GEMM="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# -------------------------------------------------------------------------- CUDA backend

def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


# Instantiates every kernel the host side (csrc/cuda/salt_cuda.cu) launches, per dtype.
_INSTANTIATE_CU = """
#include "salt_device.cuh"
template <typename T, typename A>
void instantiate() {
  using namespace salt_cuda;
  cudaStream_t s = nullptr;
  launch_column_sum_partials<T, A>(nullptr, 1, 1, 0, 0, 1, nullptr, s);
  launch_sum_partials<A, A>(nullptr, 1, 1, nullptr, s);
}
template void instantiate<float, float>();
template void instantiate<double, double>();
template void instantiate<__half, float>();
template void instantiate<__nv_bfloat16, float>();
// the mixed-adapter mix runs in the accumulation dtype only
template <typename A>
void instantiate_mix() {
  salt_cuda::launch_mix_rows<A>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 1, 1, A(1), nullptr, nullptr);
}
template void instantiate_mix<float>();
template void instantiate_mix<double>();
"""


def test_device_code_compiles_without_spills(tmp_path):
    """Plain nvcc (no torch) compiles the device header for sm_80 and sm_90; every kernel
    has no spills, no local memory (stack frame) and shared memory under 48 KiB."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    src = tmp_path / "instantiate.cu"
    src.write_text(_INSTANTIATE_CU)
    cmd = [nvcc, "-c", str(src), "-o", str(tmp_path / "instantiate.o"), "-I", str(ROOT / "csrc" / "cuda"),
           "-std=c++17", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "--resource-usage"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", log)
    assert {arch for _, arch in kernels} == {"sm_80", "sm_90"}
    per_arch = {a: sorted(n for n, arch in kernels if arch == a) for a in ("sm_80", "sm_90")}
    # column sums for 4 input dtypes, ordered partial sums in fp32 and fp64, the mix in fp32 and fp64
    assert per_arch["sm_80"] == per_arch["sm_90"] and len(per_arch["sm_80"]) == 8, per_arch
    props = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(props) == len(kernels)
    for (name, arch), (stack, st, ld) in zip(kernels, props):
        assert (int(stack), int(st), int(ld)) == (0, 0, 0), f"{name} on {arch}: stack {stack}, spills {st}/{ld}"
    for smem in re.findall(r"(\d+) bytes smem", log):
        assert int(smem) <= 48 * 1024


def test_cuda_kernels_registered():
    """A CUDA build of torch plus a CUDA toolkit at build time -> the ops have CUDA kernels
    (this needs no GPU: it checks the extension compiled and linked its CUDA part)."""
    if torch.version.cuda is None:
        pytest.skip("this torch build has no CUDA; the extension can only build its CPU part")
    if _nvcc() is None:
        pytest.skip("no CUDA toolkit (nvcc) found, so the CUDA part was not built")
    ext = _ext_or_skip()
    if not (HAS_GPU or ext.has_kernel("cuda") or os.environ.get("SALT_KERNELS_BUILD_CUDA") == "1"):
        pytest.skip("built without the CUDA part: no GPU, and SALT_KERNELS_BUILD_CUDA=1 was not set (CI sets it)")
    for op in (ext.FORWARD_OP, ext.BACKWARD_OP, "salt_kernels::salt_multi_forward",
               "salt_kernels::salt_multi_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
    if not HAS_GPU:
        assert "no CUDA device" in unavailable_reason("cuda", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [((7,), 33, 29, 5, 3), ((3, 100), 200, 300, 70, 9), ((1,), 19, 130, 12, 0)], ids=str)
def test_cuda_matches_float64(dtype, shape):
    _require("cuda", "cuda")
    lead, K, D, r, rl = shape
    t = make_salt_inputs(lead, K, D, r, rl, dtype, device="cuda")
    assert_matches_ground_truth(lambda **kw: salt_kernels.salt_linear(**kw, backend="cuda"), t, dtype, scaling=0.7)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cuda_backward_bitwise_deterministic():
    _require("cuda", "cuda")
    runs = []
    for _ in range(2):
        t = make_salt_inputs((3000,), 64, 48, 16, 4, torch.float32, device="cuda", seed=5)
        y = salt_kernels.salt_linear(**t, backend="cuda")
        names = ["x", "sigma", "X", "Y", "bias"]
        runs.append(torch.autograd.grad(y, [t[n] for n in names], torch.ones_like(y)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("M", [1023, 1024, 2048, 2500], ids=str)
def test_dC_slices_match_float64(M):
    """dC over 1024-row slices: whole slices as one batched GEMM, the rest as one more
    GEMM, the partials added in order; exact slices, a remainder and a single slice all
    match float64."""
    _require("cpu", "cpu")
    t = make_salt_inputs((M,), 24, 20, 6, 2, torch.float32, seed=M)
    assert_matches_ground_truth(lambda **kw: salt_kernels.salt_linear(**kw, backend="cpu"), t, torch.float32,
                                scaling=0.6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cuda_dC_is_one_batched_gemm():
    """On CUDA the backward's dC over the whole 1024-row slices is one batched cuBLAS
    GEMM (aten::bmm), not a GEMM per slice."""
    _require("cuda", "cuda")
    t = make_salt_inputs((4096 + 100,), 64, 48, 16, 4, torch.float32, device="cuda", seed=2)
    y = salt_kernels.salt_linear(**t, backend="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(y, [t["sigma"]], torch.ones_like(y))
    names = [e.name for e in prof.events()]
    assert names.count("aten::bmm") == 1, names
