"""The one way salt_kernels times things.

* CPU: :func:`sample_steps` -- every step warmed up, then timed in interleaved rounds
  (one sample per step per round), so that load from other processes hits all of them
  alike; reported as min and median, and ratios as the median of the per-round paired
  ratios with their interquartile range (:func:`paired_ratio`).
* CUDA: ``triton.testing.do_bench`` per step (CUDA events, L2 flushed before each
  call), or a CUDA-event loop without Triton; median. For decode shapes
  (``back_to_back=True``) also the step issued back to back without the flush, where a
  host-bound step shows its host cost (the flush's memset hides it), and the step
  replayed from a CUDA graph, where the method can be captured (no host cost at all).

Callers rotate through several copies of the inputs (:func:`methods.make_input_sets`)
so that caches do not flatter small shapes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

# CPU defaults: rounds of ~BLOCK seconds per step, at least MIN_ROUNDS of them. 15
# rounds keep the interquartile range of paired ratios meaningful at decode sizes,
# where one round is a few milliseconds.
MIN_ROUNDS = 15
BLOCK = 0.02


@dataclass
class Timing:
    """Seconds per call of one step. ``paired``: the samples are per-round and aligned
    with those of the other steps timed in the same call (CPU), so ratios can be taken
    round by round. CUDA decode shapes also carry ``back_to_back`` (median seconds per
    call of calls issued back to back, no L2 flush: host cost included) and ``graph``
    (the same, replayed from a CUDA graph; None where the step cannot be captured)."""

    samples: list
    paired: bool = False
    back_to_back: float | None = None
    graph: float | None = None

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def rounds(self) -> int:
        return len(self.samples)


@dataclass
class Ratio:
    """``base / other`` (> 1: ``other`` is faster). ``median``: of the per-round paired
    ratios when both timings are paired, else the ratio of the medians; ``low`` /
    ``high``: 25th / 75th percentile of the paired ratios (None when unpaired)."""

    median: float
    low: float | None = None
    high: float | None = None

    @property
    def spread(self) -> float | None:
        """Half the interquartile range: the noise to read next to the ratio."""
        return None if self.low is None else (self.high - self.low) / 2


def _quantile(sorted_vals, q):
    """Linear-interpolated quantile of a sorted list."""
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def paired_ratio(base: Timing, other: Timing) -> Ratio:
    """How many times faster ``other`` is than ``base``, with its round-to-round noise."""
    if base.paired and other.paired and len(base.samples) == len(other.samples):
        r = sorted(b / o for b, o in zip(base.samples, other.samples))
        return Ratio(statistics.median(r), _quantile(r, 0.25), _quantile(r, 0.75))
    return Ratio(base.median / other.median)


# Clocks for CPU timing: wall time (default), or this process's CPU time, for host-side
# code (single-threaded Python and dispatch) on a machine shared with other processes,
# whose load then does not count against the step.
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def sample_steps(steps: dict, min_time: float, *, min_rounds: int = MIN_ROUNDS, block: float = BLOCK,
                 clock: str = "wall") -> dict:
    """Seconds per call of each named CPU step, one sample per round: ``{name: [s, ...]}``.

    Interleaved rounds -- every round runs each step ``n`` times back to back (``n``
    calibrated to ~``block`` seconds) -- until at least ``min_rounds`` rounds and
    ``min_time`` seconds per step. Interleaving means a burst of load from other
    processes hits all methods alike instead of one of them. The order is shuffled
    every round (a fixed seed), so that no step always follows the same one: a step
    that churns memory (the official baseline frees hundreds of MiB, which glibc returns
    to the OS) slows the step after it, and a fixed or rotated cyclic order always hands
    that cost to the same step (``auto``, running ``reference``'s code, timed 0.71-0.78x
    ``reference`` that way). ``clock``: a key of :data:`CLOCKS` (the rounds' length is
    always wall time).
    """
    now = CLOCKS[clock]
    number = {}
    for name, step in steps.items():
        step()  # warm-up: first-call costs (allocator, lazy init) are not the step's
        t0 = time.perf_counter()
        step()
        number[name] = max(1, int(block / max(time.perf_counter() - t0, 1e-7)))
    samples: dict = {name: [] for name in steps}
    names = list(steps)
    order = random.Random(0)
    start = time.perf_counter()
    for rounds in itertools.count(1):
        for name in order.sample(names, len(names)):
            step = steps[name]
            t0 = now()
            for _ in range(number[name]):
                step()
            samples[name].append((now() - t0) / number[name])
        if rounds >= 1000 or (rounds >= min_rounds and time.perf_counter() - start >= min_time * len(steps)):
            break
    return samples


def time_steps(steps: dict, device, min_time: float, *, min_rounds: int = MIN_ROUNDS,
               block: float = BLOCK, back_to_back: bool = False, clock: str = "wall") -> dict:
    """:class:`Timing` of each named step (``{name: Timing}``): on CPU from one
    :func:`sample_steps` run (paired; CPU calls always run back to back; ``clock``: see
    :data:`CLOCKS`), on CUDA from
    :func:`_cuda_samples` per step, with ``back_to_back`` also from
    :func:`cuda_back_to_back` and :func:`cuda_graph_seconds`."""
    device = torch.device(device)
    if device.type == "cuda":
        out = {}
        for name, step in steps.items():
            out[name] = Timing(_cuda_samples(step, min_time))
            if back_to_back:
                out[name].back_to_back = cuda_back_to_back(step, min_time)
                out[name].graph = cuda_graph_seconds(step, min_time)
        return out
    samples = sample_steps(steps, min_time, min_rounds=min_rounds, block=block, clock=clock)
    return {name: Timing(v, paired=True) for name, v in samples.items()}


def time_step(step: Callable[[], None], device, min_time: float) -> float:
    """Median seconds per call of one step (:func:`time_steps`)."""
    return time_steps({"step": step}, device, min_time)["step"].median


def _cuda_samples(step, min_time: float) -> list:
    """Seconds per call on CUDA: ``triton.testing.do_bench`` (after its warm-up), or a
    CUDA-event loop without Triton."""
    step()  # warm-up: autotuning and lazy init are not the step's
    try:
        from triton.testing import do_bench
    except ImportError:
        torch.cuda.synchronize()
        times, spent = [], 0.0
        while spent < min_time or len(times) < 10:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            spent += times[-1]
        return times
    kw = dict(warmup=max(5, int(min_time * 250)), rep=max(20, int(min_time * 1000)))
    try:
        ms = do_bench(step, **kw, return_mode="all")
    except (AssertionError, ValueError):  # a Triton without return_mode="all": its median alone
        ms = [do_bench(step, **kw, return_mode="median")]
    return [t / 1e3 for t in ms]


def _event_loop(call, min_time: float) -> float:
    """Median seconds per call of ``call`` issued back to back between two CUDA events, in
    batches calibrated to ~min_time / 10 each (at least 5 batches)."""
    call()
    torch.cuda.synchronize()
    n, batches = 1, []
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            call()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        if seconds < min_time / 10 and n < (1 << 20):
            n *= 2
            continue
        batches.append(seconds / n)
        if len(batches) >= 5 and sum(batches) * n >= min_time:
            return statistics.median(batches)


def cuda_back_to_back(step: Callable[[], None], min_time: float) -> float:
    """Seconds per call of ``step`` on CUDA, calls issued back to back with no L2 flush in
    between: a step whose host code takes longer than its GPU work is timed at its host
    cost, as a decode loop sees it (``do_bench`` flushes 256 MB of L2 before each call,
    a memset of tens of microseconds that hides the host time)."""
    return _event_loop(step, min_time)


def cuda_graph_seconds(step: Callable[[], None], min_time: float) -> float | None:
    """Seconds per replay of ``step`` captured once into a CUDA graph (after a warm-up on
    a side stream, as torch.cuda.graphs recommends), replayed back to back: the GPU time
    without any host cost. None if the step cannot be captured (it synchronises, copies to
    the host, or compiles or autotunes on the way)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception:  # not capturable: the back-to-back figure stands alone
        torch.cuda.synchronize()
        return None
    try:
        return _event_loop(graph.replay, min_time)
    finally:
        del graph


def format_back_to_back(rows) -> str | None:
    """Lines for the rows (of :mod:`.report`) that carry back-to-back timings (CUDA
    decode shapes): the flushed median, back to back, and from a CUDA graph, in
    microseconds per call. None if no row has them."""
    timed = [r for r in rows if r.timing is not None and r.timing.back_to_back is not None]
    if not timed:
        return None
    out = ["decode timings (us per call): L2 flushed (do_bench) | back to back, no flush (host cost shows) | "
           "CUDA graph replay (no host cost; - where the method cannot be captured)"]
    for r in timed:
        t = r.timing
        graph = "-" if t.graph is None else f"{t.graph * 1e6:.1f}"
        out.append(f"  {r.shape.label} {r.mode:7s} {r.method.name:16s} {t.median * 1e6:8.1f} | "
                   f"{t.back_to_back * 1e6:8.1f} | {graph:>8s}")
    return "\n".join(out)


def peak_memory_bytes(step: Callable[[], None], device) -> int:
    """Bytes allocated by one call of ``step`` above what was allocated before it.
    CUDA: ``max_memory_allocated``; CPU: the running sum of the allocator's alloc/free
    events recorded by ``torch.profiler`` with ``profile_memory=True`` (tensors only:
    scratch that a BLAS library allocates for itself is not seen)."""
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


def environment(device, dtype) -> dict:
    """What a measurement ran on: device, dtype, threads, versions."""
    from importlib import metadata

    from ... import __version__
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = ""
    device = torch.device(device)
    return dict(device=device.type, device_name=device_name(device), dtype=str(dtype).replace("torch.", ""),
                threads=torch.get_num_threads(), torch=torch.__version__, triton=triton, salt_kernels=__version__)


def describe(env: dict) -> str:
    """One line naming the machine and versions of :func:`environment`."""
    return (f"{env['device_name']}, {env['dtype']}, torch {env['torch']}"
            + (f", triton {env['triton']}" if env["triton"] else "") + f", {env['threads']} thread"
            + ("s" if env["threads"] != 1 else ""))


def load_note(device) -> str | None:
    """A warning line when other processes compete for the CPU, else None."""
    if torch.device(device).type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        return (f"note: load average {load:.1f} on {cores} cores -- other processes compete for the CPU; "
                "multi-threaded timings suffer most (try --threads 1), compare ratios within this run only")
    return None
