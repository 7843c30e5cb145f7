"""``salt-bench``: verify every available backend, then time it against the baselines.

1. **Verify.** Every backend that can run on the device (``available_backends``) is
   checked against the float64 dense formula, forward and the gradients of x, sigma,
   X, Y and bias, on a few odd shapes. A backend that fails is never timed, and the
   exit code is 1.
2. **Time** forward (under ``torch.no_grad``) and forward+backward (gradients of x and
   of every trainable tensor) on shape presets named after real models, for each
   verified backend and three baselines: ``reference`` (the plain PyTorch chain,
   itself a backend), ``dense nn.Linear`` of the same size, and ``official SALT``
   (dense weight rebuilt from the full SVD every step, :mod:`.bench_baselines`).
   Also the peak memory of one forward+backward: bytes allocated by the step above
   what existed before it (its inputs and parameters). CUDA: ``max_memory_allocated``;
   CPU: the running sum of the allocator's alloc/free events recorded by
   ``torch.profiler`` with ``profile_memory=True`` (tensors only: scratch that a BLAS
   library allocates for itself is not seen).

Timing: CUDA uses ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
call; median); CPU times all methods of a shape in interleaved rounds and takes the
median (:func:`time_steps`), so load from other processes hits them alike.
Both rotate through several copies of the inputs so that caches do not flatter small
shapes. On a GPU, SALT rows also report achieved bandwidth over the minimum bytes
(DESIGN.md section 6) as a fraction of the device's peak (``--bandwidth`` overrides).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

import torch

from . import __version__, available_backends, salt_linear
from .dispatch import _BACKEND_MODULES, unavailable_reason
from .bench_baselines import dense_linear, official_rebuild_flops, official_salt_forward

# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: a model's layer (``K -> D``), ``M`` rows, ranks ``r``, ``r'``."""

    preset: str
    layer: str
    M: int
    K: int
    D: int
    r: int
    rl: int

    @property
    def label(self) -> str:
        return f"{self.layer} M={self.M} r={self.r} r'={self.rl}"

    @property
    def short(self) -> str:
        return f"{self.layer}\nM={self.M} r={self.r}/{self.rl}"


def _rank10(K: int, D: int) -> int:
    """The SALT paper's other rank setting: 10% of min(D, K)."""
    return max(1, round(0.1 * min(D, K)))


# Layers of real models: (name, tokens M, in K, out D). Token counts: ViT-B/16 at 224 px
# has 197 tokens per image (batch 16 here, 4 in --quick); SAM's ViT-L image encoder
# sees 64x64 = 4096 tokens per 1024 px image; LLaMA-7B prefill of 2048 tokens, decode
# of 1-16 sequences.
_VIT_B = [("ViT-B/16 attn qkv", 197 * 16, 768, 2304), ("ViT-B/16 MLP fc1", 197 * 16, 768, 3072)]
_SAM_L = [("SAM ViT-L attn qkv", 4096, 1024, 3072), ("SAM ViT-L MLP fc1", 4096, 1024, 4096)]
_LLAMA = [("LLaMA-7B q_proj", 2048, 4096, 4096), ("LLaMA-7B MLP up", 2048, 4096, 11008)]


def _with_ranks(preset, layers, lora_rank=8):
    """Each layer at r = 64 and r = 10% of min(D, K), r' = 8."""
    out = []
    for name, M, K, D in layers:
        for r in sorted({64, _rank10(K, D)}):
            out.append(Shape(preset, name, M, K, D, r, min(lora_rank, r)))
    return out


PRESETS: dict[str, list[Shape]] = {
    "vit-b16": _with_ranks("vit-b16", _VIT_B),
    "sam-vit-l": _with_ranks("sam-vit-l", _SAM_L),
    "llama7b": _with_ranks("llama7b", _LLAMA),
    "decode": [Shape("decode", "LLaMA-7B q_proj", M, 4096, 4096, 64, 8) for M in (1, 4, 16)]
    + [Shape("decode", "LLaMA-7B MLP up", 16, 4096, 11008, 64, 8)],
    # r' sweep as in the SALT paper's ablation (r' <= r), on SAM ViT-L attention.
    "lora-rank": [Shape("lora-rank", "SAM ViT-L attn qkv", 4096, 1024, 3072, r, rl)
                  for r, rl in [(64, 8), (64, 32), (64, 64), (256, 8), (256, 64), (256, 256)]],
    # Token sweep at one layer: where the kernel targets are set (M <= 512 and M = 8192).
    "tokens": [Shape("tokens", "LLaMA-7B q_proj", M, 4096, 4096, 64, 8) for M in (1, 16, 64, 512, 8192)],
    # Small enough for a 2-core CPU in well under 2 minutes (the --quick default there).
    "quick": [Shape("quick", "ViT-B/16 attn qkv", 197 * 4, 768, 2304, 64, 8),
              Shape("quick", "ViT-B/16 MLP fc1", 197 * 4, 768, 3072, _rank10(768, 3072), 8),
              Shape("quick", "SAM ViT-L attn qkv", 1024, 1024, 3072, 64, 8),
              Shape("quick", "LLaMA-7B q_proj", 16, 4096, 4096, 64, 8)],
    # Seconds, for tests of the CLI itself.
    "smoke": [Shape("smoke", "tiny", 64, 96, 128, 16, 4), Shape("smoke", "tiny decode", 2, 96, 128, 16, 0)],
}
FULL_PRESETS = ["vit-b16", "sam-vit-l", "llama7b", "decode", "tokens", "lora-rank"]

# --------------------------------------------------------------------------- verification

# Max |error| relative to max |float64 truth|, per dtype. Kept equal to the tests'
# TOLERANCES table (tests/salt_testing.py; tests/test_bench.py checks they agree).
VERIFY_TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
}

# (M, K, D, r, r'): none a multiple of a block size; a single row; r' = 0.
VERIFY_SHAPES = [(33, 65, 47, 17, 8), (1, 128, 96, 16, 4), (130, 96, 200, 24, 0)]
VERIFY_GRADS = ("x", "sigma", "X", "Y", "bias")


def _verify_inputs(M, K, D, r, rl, g):
    """float64 SALT tensors scaled like a real layer (orthonormal-ish U, V; sigma ~ 1)."""
    return dict(
        x=torch.randn(M, K, generator=g, dtype=torch.float64),
        U=torch.randn(D, r, generator=g, dtype=torch.float64) * D ** -0.5,
        V=torch.randn(K, r, generator=g, dtype=torch.float64) * K ** -0.5,
        sigma=torch.rand(r, generator=g, dtype=torch.float64) + 0.5,
        X=torch.randn(r, rl, generator=g, dtype=torch.float64) * 0.5,
        Y=torch.randn(rl, r, generator=g, dtype=torch.float64) * 0.5,
        bias=torch.randn(D, generator=g, dtype=torch.float64) * 0.1,
    )


def _dense_f64(x, U, V, sigma, X, Y, bias):
    return x @ (U @ (torch.diag(sigma) + X @ Y) @ V.t()).t() + bias


def _rel_err(actual, expected) -> float:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if not expected.numel():
        return 0.0
    err = (actual.detach().double().cpu() - expected).abs().max().item()
    return err / scale if scale > 0 else err


def verify_backends(device, dtypes=(torch.float32,), backends=None, seed: int = 0) -> dict:
    """Max relative error (forward and the gradients of x, sigma, X, Y, bias) of each
    backend against the float64 dense formula, per dtype.

    Returns ``{backend: {dtype: (max_err, tolerance, worst_quantity)}}``. ``x`` is
    passed non-contiguous (a transposed view) on every other shape, as real layers see it.
    """
    device = torch.device(device)
    backends = available_backends(device) if backends is None else backends
    results: dict = {b: {} for b in backends}
    g = torch.Generator().manual_seed(seed)
    for i, (M, K, D, r, rl) in enumerate(VERIFY_SHAPES):
        t64 = {k: v.requires_grad_(k in VERIFY_GRADS) for k, v in _verify_inputs(M, K, D, r, rl, g).items()}
        y64 = _dense_f64(**t64)
        grad_out = torch.randn(y64.shape, generator=g, dtype=torch.float64)
        truth = dict(zip(("y",) + VERIFY_GRADS,
                         (y64.detach(), *torch.autograd.grad(y64, [t64[n] for n in VERIFY_GRADS], grad_out))))
        for dtype in dtypes:
            for name in backends:
                args = {}
                for k, v in t64.items():
                    a = v.detach().to(device=device, dtype=dtype)
                    if k == "x" and i % 2 == 0:
                        a = a.t().contiguous().t()  # same values, column-major strides
                    args[k] = a.requires_grad_(k in VERIFY_GRADS)
                try:
                    y = salt_linear(**args, backend=name)
                    got = dict(zip(("y",) + VERIFY_GRADS,
                                   (y, *torch.autograd.grad(y, [args[n] for n in VERIFY_GRADS],
                                                            grad_out.to(device=device, dtype=dtype),
                                                            allow_unused=True))))
                except Exception as exc:  # a crashing backend fails verification; the others go on
                    results[name][dtype] = (math.inf, VERIFY_TOLERANCES[dtype],
                                            f"raised {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                if math.isinf(results[name].get(dtype, (0.0,))[0]):
                    continue  # keep the first error message
                for q, expected in truth.items():
                    a = got[q]
                    err = math.inf if a is None or a.shape != expected.shape else _rel_err(a, expected)
                    if expected.numel() == 0:
                        err = 0.0  # empty X, Y at r' = 0: nothing to compare
                    prev = results[name].get(dtype, (-1.0, None, None))
                    if err > prev[0] or math.isnan(err):
                        results[name][dtype] = (err, VERIFY_TOLERANCES[dtype], q)
    return results


def verification_passed(entry) -> bool:
    err, tol, _ = entry
    return not math.isnan(err) and err <= tol

# --------------------------------------------------------------------------- methods


@dataclass
class Inputs:
    """The arguments of one method's forward, which of them are trained, and dL/dy."""

    args: dict
    trainable: list
    grad_out: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.args.values() if t is not None) + \
            self.grad_out.numel() * self.grad_out.element_size()


@dataclass
class Method:
    """Something timed: a SALT backend or a baseline."""

    name: str
    kind: str  # "salt" (a backend of salt_linear) or "baseline"
    make_inputs: Callable  # (shape, dtype, device, generator) -> Inputs
    forward: Callable  # (**args) -> y
    note: str = ""
    skip_reason: Callable = field(default=lambda shape: None)  # shape -> str | None


def _randn(g, device, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _salt_inputs(s: Shape, dtype, device, g) -> Inputs:
    a = dict(
        x=_randn(g, device, dtype, s.M, s.K),
        U=_randn(g, device, dtype, s.D, s.r, scale=s.D ** -0.5),
        V=_randn(g, device, dtype, s.K, s.r, scale=s.K ** -0.5),
        sigma=(torch.rand(s.r, generator=g) + 0.5).to(device=device, dtype=dtype),
        X=_randn(g, device, dtype, s.r, s.rl, scale=0.5),
        Y=_randn(g, device, dtype, s.rl, s.r, scale=0.5),
        bias=_randn(g, device, dtype, s.D, scale=0.1),
    )
    trainable = [a[k] for k in ("x", "sigma", "X", "Y", "bias") if a[k].numel()]
    for t in trainable:
        t.requires_grad_(True)
    return Inputs(a, trainable, _randn(g, device, dtype, s.M, s.D))


def _dense_inputs(s: Shape, dtype, device, g) -> Inputs:
    a = dict(x=_randn(g, device, dtype, s.M, s.K), weight=_randn(g, device, dtype, s.D, s.K, scale=s.K ** -0.5),
             bias=_randn(g, device, dtype, s.D, scale=0.1))
    for t in a.values():
        t.requires_grad_(True)
    return Inputs(a, list(a.values()), _randn(g, device, dtype, s.M, s.D))


def _official_inputs(s: Shape, dtype, device, g) -> Inputs:
    # Random basis with the full-SVD shapes: timing does not depend on the values, and
    # an exact SVD of a 4096 x 11008 weight would take longer than the benchmark.
    R = min(s.D, s.K)
    a = dict(
        x=_randn(g, device, dtype, s.M, s.K),
        U_full=_randn(g, device, dtype, s.D, R, scale=s.D ** -0.5),
        S_full=(torch.rand(R, generator=g) + 0.5).to(device=device, dtype=dtype),
        Vh_full=_randn(g, device, dtype, R, s.K, scale=s.K ** -0.5),
        scale=torch.ones(s.r, device=device, dtype=dtype),
        shift=torch.zeros(s.r, device=device, dtype=dtype),
        scale_frozen=torch.ones(R - s.r, device=device, dtype=dtype),
        shift_frozen=torch.zeros(R - s.r, device=device, dtype=dtype),
        lora_X=_randn(g, device, dtype, s.D, s.rl, scale=0.01),
        lora_Y=_randn(g, device, dtype, s.rl, s.K, scale=0.01),
        bias=_randn(g, device, dtype, s.D, scale=0.1),
    )
    trainable = [a[k] for k in ("x", "scale", "shift", "lora_X", "lora_Y", "bias") if a[k].numel()]
    for t in trainable:
        t.requires_grad_(True)
    return Inputs(a, trainable, _randn(g, device, dtype, s.M, s.D))


def _salt_forward(name):
    def forward(x, U, V, sigma, X, Y, bias):
        return salt_linear(x, U, V, sigma, X, Y, bias, backend=name)
    return forward


REFERENCE = "reference"
DENSE = "dense nn.Linear"
OFFICIAL = "official SALT"


def is_interpreted(backend: str, device) -> bool:
    """True for Triton kernels running in the CPU interpreter (verified, never timed)."""
    return backend == "triton" and torch.device(device).type == "cpu"


def build_methods(device, backends, official_max_gflop: float | None = None) -> list[Method]:
    """Timed methods: the given (verified) backends, then the dense and official baselines."""
    methods = [Method(b, "salt", _salt_inputs, _salt_forward(b),
                      note="plain PyTorch chain" if b == REFERENCE else "")
               for b in backends if not is_interpreted(b, device)]

    def official_skip(s: Shape):
        gflop = official_rebuild_flops(s.D, s.K, s.rl) / 1e9
        if official_max_gflop is not None and gflop > official_max_gflop:
            return f"skipped: rebuild is {gflop:.0f} GFLOP/step > --official-max-gflop {official_max_gflop:g}"
        return None

    methods.append(Method(DENSE, "baseline", _dense_inputs, dense_linear, note="full fine-tuning"))
    methods.append(Method(OFFICIAL, "baseline", _official_inputs, official_salt_forward,
                          note="dense weight rebuilt from full SVD", skip_reason=official_skip))
    return methods

# --------------------------------------------------------------------------- timing


def make_input_sets(method: Method, shape: Shape, dtype, device, *, seed=0, target_bytes=None) -> list[Inputs]:
    """Several independent copies of the inputs, cycled through by the timed step, so
    that a small problem is not served from cache every call (up to 8 copies, enough to
    exceed ``target_bytes``: 256 MiB on CUDA, 64 MiB on CPU)."""
    device = torch.device(device)
    if target_bytes is None:
        target_bytes = (256 if device.type == "cuda" else 64) * 2 ** 20
    g = torch.Generator().manual_seed(seed)
    first = method.make_inputs(shape, dtype, device, g)
    n = max(1, min(8, math.ceil(target_bytes / max(first.nbytes(), 1))))
    return [first] + [method.make_inputs(shape, dtype, device, g) for _ in range(n - 1)]


def make_step(method: Method, sets: list[Inputs], mode: str, *, sync: bool = False) -> Callable[[], None]:
    """The timed callable: ``mode="fwd"`` runs the forward under ``no_grad``;
    ``"fwd+bwd"`` runs it with autograd and takes the gradients of every trainable
    input (``torch.autograd.grad``, so nothing accumulates between calls)."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode: expected 'fwd' or 'fwd+bwd', got {mode!r}")
    cycle = itertools.cycle(sets)
    forward = method.forward

    def fwd():
        s = next(cycle)
        with torch.no_grad():
            forward(**s.args)

    def fwd_bwd():
        s = next(cycle)
        y = forward(**s.args)
        torch.autograd.grad(y, s.trainable, s.grad_out)

    step = fwd if mode == "fwd" else fwd_bwd
    if not sync:
        return step

    def synced():
        step()
        torch.cuda.synchronize()
    return synced


def time_step(step: Callable[[], None], device, min_time: float) -> float:
    """Median seconds per call. CUDA: ``triton.testing.do_bench`` (CUDA events, L2
    flushed between calls) or a CUDA-event loop without Triton; CPU:
    ``torch.utils.benchmark.Timer.blocked_autorange`` on all intra-op threads."""
    device = torch.device(device)
    step()  # warm-up: first-call costs (allocator, autotuning, lazy init) are not the layer's
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_median(step, min_time)
        return do_bench(step, warmup=max(5, int(min_time * 250)), rep=max(20, int(min_time * 1000)),
                        return_mode="median") / 1e3
    from torch.utils.benchmark import Timer
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median


def time_steps(steps: dict, device, min_time: float, *, min_rounds: int = 3, block: float = 0.02) -> dict:
    """Median seconds per call of each named step.

    CUDA: :func:`time_step` for each (GPU timing, CPU load barely matters). CPU: the
    median of :func:`sample_steps`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {name: time_step(step, device, min_time) for name, step in steps.items()}
    samples = sample_steps(steps, min_time, min_rounds=min_rounds, block=block)
    return {name: statistics.median(v) for name, v in samples.items()}


def sample_steps(steps: dict, min_time: float, *, min_rounds: int = 3, block: float = 0.02) -> dict:
    """Seconds per call of each named CPU step, one sample per round.

    Interleaved rounds -- every round runs each step ``n`` times back to back (``n``
    calibrated to ~``block`` seconds) -- until at least ``min_rounds`` rounds and
    ``min_time`` seconds per step. Interleaving means a burst of load from other
    processes hits all methods alike instead of one of them. The order rotates from
    round to round, so that no step always follows the same one: a step that churns
    memory (the official baseline frees hundreds of MiB, which glibc returns to the OS)
    would otherwise always hand the next step cold caches and page faults.
    """
    number = {}
    for name, step in steps.items():
        step()  # warm-up
        t0 = time.perf_counter()
        step()
        number[name] = max(1, int(block / max(time.perf_counter() - t0, 1e-7)))
    samples: dict = {name: [] for name in steps}
    names = list(steps)
    start = time.perf_counter()
    for rounds in itertools.count(1):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            step = steps[name]
            t0 = time.perf_counter()
            for _ in range(number[name]):
                step()
            samples[name].append((time.perf_counter() - t0) / number[name])
        if rounds >= 1000 or (rounds >= min_rounds and time.perf_counter() - start >= min_time * len(steps)):
            break
    return samples


def _cuda_event_median(step, min_time):
    torch.cuda.synchronize()
    times = []
    spent = 0.0
    while spent < min_time or len(times) < 10:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        spent += times[-1]
    return sorted(times)[len(times) // 2]


def peak_memory_bytes(step: Callable[[], None], device) -> int:
    """Bytes allocated by one call of ``step`` above what was allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" on GPU-less machines
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:  # allocations positive, frees negative, in time order
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto prints profiler start/stop lines straight to file descriptor 2; they would
    interleave with the progress bar. (The step already ran cleanly while being timed.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def min_bytes(shape: Shape, mode: str, elem: int) -> int:
    """Bytes a SALT layer must move at least (DESIGN.md section 6). Forward: read x and
    U, V once, write y. Backward adds: read dL/dy and U, V, write dx (Z is M x r, small)."""
    fwd = elem * (shape.M * shape.K + shape.M * shape.D + (shape.D + shape.K) * shape.r)
    return fwd if mode == "fwd" else 2 * fwd


# Peak DRAM bandwidth (GB/s) by device-name substring, first match wins.
PEAK_BANDWIDTH_GBPS = [
    ("GH200", 4000), ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
    ("H800", 3350), ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555),
    ("L40S", 864), ("L40", 864), ("L4", 300), ("A10", 600), ("RTX 4090", 1008), ("RTX 3090", 936),
]


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return (platform.processor() or "CPU") + f" ({os.cpu_count()} cores)"


def peak_bandwidth_gbps(name: str) -> float | None:
    for key, bw in PEAK_BANDWIDTH_GBPS:
        if key in name:
            return float(bw)
    return None

# --------------------------------------------------------------------------- running


@dataclass
class Row:
    shape: Shape
    method: Method
    mode: str
    seconds: float | None = None
    peak_bytes: int | None = None
    skip: str | None = None
    vs_reference: float | None = None
    vs_official: float | None = None
    vs_dense: float | None = None
    gbps: float | None = None
    roofline: float | None = None


def run_benchmarks(shapes, methods, device, dtype, *, min_time, bandwidth_gbps=None, progress=True) -> list[Row]:
    """Time every method on every shape in both modes (and its fwd+bwd peak memory).
    All methods of one shape and mode are timed together (:func:`time_steps`), so on a
    shared CPU their ratios see the same load."""
    from tqdm import tqdm
    device = torch.device(device)
    elem = torch.empty((), dtype=dtype).element_size()
    rows: list[Row] = []
    bar = tqdm(total=2 * len(shapes), desc="salt-bench", unit="run", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for shape in shapes:
        active = [m for m in methods if not m.skip_reason(shape)]
        rows += [Row(shape, m, mode, skip=m.skip_reason(shape)) for m in methods if m.skip_reason(shape)
                 for mode in ("fwd", "fwd+bwd")]
        sets = {m.name: make_input_sets(m, shape, dtype, device) for m in active}
        for mode in ("fwd", "fwd+bwd"):
            bar.set_postfix_str(f"{shape.layer} M={shape.M} r={shape.r} {mode}", refresh=True)
            steps = {m.name: make_step(m, sets[m.name], mode) for m in active}
            seconds = time_steps(steps, device, min_time)
            for m in active:
                row = Row(shape, m, mode, seconds=seconds[m.name])
                if mode == "fwd+bwd":
                    row.peak_bytes = peak_memory_bytes(steps[m.name], device)
                if bandwidth_gbps and m.kind == "salt":
                    row.gbps = min_bytes(shape, mode, elem) / row.seconds / 1e9
                    row.roofline = row.gbps / bandwidth_gbps
                rows.append(row)
            bar.update(1)
        del sets, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    order = {(s, m.name): i for i, (s, m) in enumerate((s, m) for s in shapes for m in methods)}
    rows.sort(key=lambda r: (order[(r.shape, r.method.name)], r.mode != "fwd"))
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[Row]) -> None:
    """Speed-ups: baseline time / this method's time (> 1 means faster than the baseline)."""
    by_key = {(r.shape, r.mode, r.method.name): r for r in rows if r.seconds}
    for r in rows:
        if not r.seconds:
            continue
        for attr, base in (("vs_reference", REFERENCE), ("vs_official", OFFICIAL), ("vs_dense", DENSE)):
            b = by_key.get((r.shape, r.mode, base))
            if b is not None:
                setattr(r, attr, b.seconds / r.seconds)

# --------------------------------------------------------------------------- output

CSV_FIELDS = ["device", "device_name", "dtype", "threads", "torch", "triton", "salt_kernels", "backend", "kind",
              "preset", "layer", "M", "K", "D", "r", "r_lora", "mode", "time_ms", "speedup_vs_reference",
              "speedup_vs_official", "speedup_vs_dense", "peak_mem_MiB", "achieved_GBps", "roofline_fraction",
              "verify_max_rel_err", "note"]


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def write_csv(path, rows: list[Row], meta: dict, verify_errors: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            s = r.shape
            err = verify_errors.get(r.method.name)
            w.writerow(dict(
                meta, backend=r.method.name, kind=r.method.kind, preset=s.preset, layer=s.layer, M=s.M, K=s.K,
                D=s.D, r=s.r, r_lora=s.rl, mode=r.mode, time_ms=_fmt(r.seconds and r.seconds * 1e3, ".4f"),
                speedup_vs_reference=_fmt(r.vs_reference, ".3f"), speedup_vs_official=_fmt(r.vs_official, ".3f"),
                speedup_vs_dense=_fmt(r.vs_dense, ".3f"),
                peak_mem_MiB=_fmt(r.peak_bytes and r.peak_bytes / 2 ** 20, ".4f"),
                achieved_GBps=_fmt(r.gbps, ".1f"), roofline_fraction=_fmt(r.roofline, ".3f"),
                verify_max_rel_err=_fmt(err, ".2e"), note=r.skip or r.method.note))


def _table(rows: list[Row], markdown: bool, with_roofline: bool) -> str:
    """One line per (shape, method): fwd and fwd+bwd times with their speed-ups."""
    head = ["shape", "method", "fwd ms", "×ref", "×official", "fwd+bwd ms", "×ref", "×official", "peak MiB"]
    if with_roofline:
        head += ["fwd % BW", "fwd+bwd % BW"]
    pairs: dict = {}
    for r in rows:
        pairs.setdefault((r.shape, r.method.name), {})[r.mode] = r
    lines, skips = [], []
    for (shape, name), modes in pairs.items():
        f, b = modes.get("fwd"), modes.get("fwd+bwd")
        skips.append(bool(f.skip))
        if f.skip:
            cells = [shape.label, name, f.skip] + [""] * (len(head) - 3)
        else:
            cells = [shape.label, name,
                     _fmt(f.seconds * 1e3, ".3f"), _fmt(f.vs_reference, ".2f"), _fmt(f.vs_official, ".1f"),
                     _fmt(b.seconds * 1e3, ".3f"), _fmt(b.vs_reference, ".2f"), _fmt(b.vs_official, ".1f"),
                     _fmt(b.peak_bytes and b.peak_bytes / 2 ** 20, ".1f")]
            if with_roofline:
                cells += [_fmt(f.roofline and 100 * f.roofline, ".0f"), _fmt(b.roofline and 100 * b.roofline, ".0f")]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c for c in cells) + " |" for cells in lines]
        return "\n".join(out)
    timed = [c for c, skipped in zip(lines, skips) if not skipped]
    widths = [max([len(head[i])] + [len(c[i]) for c in (timed if i >= 2 else lines)]) for i in range(len(head))]
    out, prev = [], None
    for cells, skipped in zip(lines, skips):
        if cells[0] != prev and prev is not None:
            out.append("")
        shown = cells if cells[0] != prev else [""] + cells[1:]
        prev = cells[0]
        if skipped:  # the reason, in place of the numbers
            out.append("  ".join([shown[0].ljust(widths[0]), shown[1].ljust(widths[1]), cells[2]]))
            continue
        out.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(shown)))
    header = "  ".join(h.ljust(widths[i]) if i < 2 else h.rjust(widths[i]) for i, h in enumerate(head))
    return "\n".join([header, "-" * len(header)] + out)


def format_table(rows: list[Row], *, markdown: bool = False, with_roofline: bool = False) -> str:
    return _table(rows, markdown, with_roofline)


def write_plots(out_dir, rows: list[Row], title: str) -> list[str]:
    """Bar charts of speed-up per shape: over the reference chain and over the official
    SALT way, forward and forward+backward. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    shapes = list(dict.fromkeys(r.shape for r in rows))
    for attr, base, fname in (("vs_reference", REFERENCE, "speedup_vs_reference.png"),
                              ("vs_official", OFFICIAL, "speedup_vs_official.png")):
        names = [n for n in dict.fromkeys(r.method.name for r in rows) if n != base]
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(shapes) * 2), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], ("fwd", "fwd+bwd")):
            width = 0.8 / max(1, len(names))
            for j, name in enumerate(names):
                vals = []
                for s in shapes:
                    r = next((r for r in rows if r.shape == s and r.mode == mode and r.method.name == name), None)
                    vals.append(getattr(r, attr) if r is not None and getattr(r, attr) else float("nan"))
                xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(shapes))]
                bars = ax.bar(xs, vals, width, label=name)
                ax.bar_label(bars, labels=["" if v != v else f"{v:.2g}" for v in vals], fontsize=6)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(shapes)), [s.short for s in shapes], fontsize=7)
            ax.set_ylabel(f"speed-up over {base} (×)")
            ax.set_title(mode, fontsize=10)
            ax.grid(axis="y", which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written

# --------------------------------------------------------------------------- CLI


def _parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"--dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


def _triton_version() -> str:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return ""


def _parser():
    p = argparse.ArgumentParser(prog="salt-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None,
                      help="small shape set and short timing (default on CPU; < 2 min on 2 cores)")
    size.add_argument("--full", action="store_true", help="every preset (default on CUDA)")
    p.add_argument("--presets", default=None,
                   help=f"comma-separated presets to run instead ({', '.join(PRESETS)})")
    p.add_argument("--list-presets", action="store_true", help="print the presets' shapes and exit")
    p.add_argument("--dtype", type=_parse_dtype, default=None, help="fp32 | fp16 | bf16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timing per measurement (default 0.5 quick, 1.0 full)")
    p.add_argument("--official-max-gflop", type=float, default=None,
                   help="skip the official baseline where rebuilding its weight costs more (default 20 with --quick on CPU)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="peak memory bandwidth in GB/s for the roofline (default: looked up from the GPU name)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to verify and time (default: every available one)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (torch.set_num_threads; default: torch's default)")
    p.add_argument("--verify-only", action="store_true", help="verify the backends and exit")
    p.add_argument("--output", default=None, help="directory for results.csv and the PNG plots")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown (for README)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    started = time.perf_counter()
    args = _parser().parse_args(argv)
    if args.list_presets:
        for name, shapes in PRESETS.items():
            print(f"{name}:")
            for s in shapes:
                print(f"  {s.layer:22s} M={s.M:<6d} K={s.K:<6d} D={s.D:<6d} r={s.r:<4d} r'={s.rl}")
        return 0
    if args.threads is not None:
        if args.threads < 1:
            print(f"salt-bench: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("salt-bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    quick = (device.type == "cpu") if (args.quick is None and not args.full) else bool(args.quick)
    dtype = args.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.presets:
        names = [n.strip() for n in args.presets.split(",") if n.strip()]
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            print(f"salt-bench: unknown preset(s) {unknown}; choose from {list(PRESETS)}", file=sys.stderr)
            return 2
    else:
        names = ["quick"] if quick else FULL_PRESETS
    # the same layer and ranks in two presets (e.g. sam-vit-l and lora-rank) is timed once
    shapes, seen = [], set()
    for s in (s for n in names for s in PRESETS[n]):
        if (s.layer, s.M, s.K, s.D, s.r, s.rl) not in seen:
            seen.add((s.layer, s.M, s.K, s.D, s.r, s.rl))
            shapes.append(s)
    min_time = args.min_time if args.min_time is not None else (0.5 if quick else 1.0)
    official_cap = args.official_max_gflop
    if official_cap is None and quick and device.type == "cpu":
        official_cap = 20.0

    name = device_name(device)
    bandwidth = args.bandwidth or (peak_bandwidth_gbps(name) if device.type == "cuda" else None)
    if device.type == "cuda" and bandwidth is None:
        print(f"note: peak bandwidth of {name!r} unknown; pass --bandwidth GB/s for the roofline columns")
    meta = dict(device=device.type, device_name=name, dtype=str(dtype).replace("torch.", ""),
                threads=torch.get_num_threads(), torch=torch.__version__, triton=_triton_version(),
                salt_kernels=__version__)
    print(f"salt-bench: {name}, {meta['dtype']}, torch {torch.__version__}"
          + (f", triton {meta['triton']}" if meta["triton"] else "") + f", {meta['threads']} threads")

    # 1. verification, in fp32 and in the timing dtype
    backends = available_backends(device)
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        for b in wanted:
            if b not in backends:
                print(f"salt-bench: backend {b!r} is not available on {device.type}: "
                      f"{unavailable_reason(b, device) if b in _BACKEND_MODULES else 'unknown backend'}",
                      file=sys.stderr)
                return 2
        backends = [b for b in backends if b in wanted or b == REFERENCE]  # reference: the baseline
    vdtypes = list(dict.fromkeys([torch.float32, dtype]))
    results = verify_backends(device, vdtypes, backends)
    verified, ok, verify_errors = [], True, {}
    print("verification against float64 (max relative error over forward, dx, dsigma, dX, dY, dbias):")
    for b in backends:
        good = all(verification_passed(e) for e in results[b].values())
        ok &= good
        verify_errors[b] = max(e[0] for e in results[b].values())
        detail = ", ".join(f"{str(dt).replace('torch.', '')} {e[0]:.1e} (tol {e[1]:.0e}, worst {e[2]})"
                           for dt, e in results[b].items())
        extra = " [Triton interpreter: verified, not timed]" if is_interpreted(b, device) else ""
        print(f"  {b:10s} {'ok    ' if good else 'FAILED'} {detail}{extra}")
        if good:
            verified.append(b)
    if not ok:
        print("salt-bench: a backend FAILED verification; it is not timed.", file=sys.stderr)
    if args.verify_only:
        return 0 if ok else 1

    # 2. timing
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:
            print(f"note: load average {load:.1f} on {cores} cores -- other processes compete for the CPU; "
                  "multi-threaded timings suffer most (try --threads 1), compare ratios within this run only")
    if REFERENCE not in verified:
        print("salt-bench: the reference backend failed verification; nothing to compare against.", file=sys.stderr)
        return 1
    methods = build_methods(device, verified, official_cap)
    print(f"timing {len(shapes)} shapes x {len(methods)} methods ({', '.join(m.name for m in methods)}), "
          f"{'quick' if quick else 'full'}, {min_time:g} s per measurement"
          + (f"; roofline at {bandwidth:g} GB/s" if bandwidth else ""))
    rows = run_benchmarks(shapes, methods, device, dtype, min_time=min_time, bandwidth_gbps=bandwidth,
                          progress=not args.no_progress)
    print()
    print(format_table(rows, markdown=args.markdown, with_roofline=bool(bandwidth)))
    print("\n×ref, ×official: speed-up over the reference chain / the official SALT way (> 1 is faster); "
          "fwd under no_grad; peak MiB: memory allocated by one fwd+bwd above its inputs"
          + ("; % BW: minimum bytes / time as a share of peak bandwidth" if bandwidth else ""))
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        csv_path = os.path.join(args.output, "results.csv")
        write_csv(csv_path, rows, meta, verify_errors)
        title = f"salt-bench on {name}, {meta['dtype']}, {meta['threads']} threads, torch {torch.__version__}"
        pngs = write_plots(args.output, rows, title)
        print(f"wrote {csv_path}, " + ", ".join(pngs))
    print(f"salt-bench finished in {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
