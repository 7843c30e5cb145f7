"""What is timed: SALT backends (``auto`` among them) and the baselines, with their
inputs and the timed step (forward, or forward+backward)."""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ...ops import dispatch, salt_linear
from .baselines import dense_linear, official_rebuild_flops, official_salt_forward
from .presets import Shape

REFERENCE = "reference"
AUTO = "auto"
DENSE = "dense nn.Linear"
OFFICIAL = "official SALT"
# --baselines names -> method names
BASELINE_NAMES = {"dense": DENSE, "official": OFFICIAL}


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
    kind: str  # "salt" (a backend of salt_linear, or "auto") or "baseline"
    make_inputs: Callable  # (shape, dtype, device, generator) -> Inputs
    forward: Callable  # (**args) -> y
    note: str = ""
    skip_reason: Callable = field(default=lambda shape: None)  # shape -> str | None


def _randn(g, device, dtype, *shape, scale=1.0):
    # drawn where the generator lives (on a GPU: the device; a CPU draw of the large
    # presets' inputs took about a minute)
    return (torch.randn(*shape, generator=g, device=g.device) * scale).to(device=device, dtype=dtype)


def _rand(g, device, dtype, *shape):
    return torch.rand(*shape, generator=g, device=g.device).to(device=device, dtype=dtype)


def _trained(a: dict, names, grad_out) -> Inputs:
    trainable = [a[k] for k in names if a[k].numel()]
    for t in trainable:
        t.requires_grad_(True)
    return Inputs(a, trainable, grad_out)


def salt_inputs(s: Shape, dtype, device, g) -> Inputs:
    """SALT layer tensors scaled like a real layer; x, sigma, X, Y and the bias trained."""
    a = dict(
        x=_randn(g, device, dtype, s.M, s.K),
        U=_randn(g, device, dtype, s.D, s.r, scale=s.D ** -0.5),
        V=_randn(g, device, dtype, s.K, s.r, scale=s.K ** -0.5),
        sigma=_rand(g, device, dtype, s.r) + 0.5,
        X=_randn(g, device, dtype, s.r, s.rl, scale=0.5),
        Y=_randn(g, device, dtype, s.rl, s.r, scale=0.5),
        bias=_randn(g, device, dtype, s.D, scale=0.1),
    )
    return _trained(a, ("x", "sigma", "X", "Y", "bias"), _randn(g, device, dtype, s.M, s.D))


def _dense_inputs(s: Shape, dtype, device, g) -> Inputs:
    a = dict(x=_randn(g, device, dtype, s.M, s.K), weight=_randn(g, device, dtype, s.D, s.K, scale=s.K ** -0.5),
             bias=_randn(g, device, dtype, s.D, scale=0.1))
    return _trained(a, a, _randn(g, device, dtype, s.M, s.D))


def _official_inputs(s: Shape, dtype, device, g) -> Inputs:
    # Random basis with the full-SVD shapes: timing does not depend on the values, and
    # an exact SVD of a 4096 x 11008 weight would take longer than the benchmark.
    R = min(s.D, s.K)
    a = dict(
        x=_randn(g, device, dtype, s.M, s.K),
        U_full=_randn(g, device, dtype, s.D, R, scale=s.D ** -0.5),
        S_full=_rand(g, device, dtype, R) + 0.5,
        Vh_full=_randn(g, device, dtype, R, s.K, scale=s.K ** -0.5),
        scale=torch.ones(s.r, device=device, dtype=dtype),
        shift=torch.zeros(s.r, device=device, dtype=dtype),
        scale_frozen=torch.ones(R - s.r, device=device, dtype=dtype),
        shift_frozen=torch.zeros(R - s.r, device=device, dtype=dtype),
        lora_X=_randn(g, device, dtype, s.D, s.rl, scale=0.01),
        lora_Y=_randn(g, device, dtype, s.rl, s.K, scale=0.01),
        bias=_randn(g, device, dtype, s.D, scale=0.1),
    )
    return _trained(a, ("x", "scale", "shift", "lora_X", "lora_Y", "bias"), _randn(g, device, dtype, s.M, s.D))


def _salt_forward(name):
    def forward(x, U, V, sigma, X, Y, bias):
        return salt_linear(x, U, V, sigma, X, Y, bias, backend=name)
    return forward


def is_interpreted(backend: str, device) -> bool:
    """True for Triton kernels running in the CPU interpreter (verified, never timed)."""
    return backend == "triton" and torch.device(device).type == "cpu"


def auto_choice(device, shape: Shape) -> str | None:
    """The backend ``auto`` resolves to for ``shape``, as far as
    ``dispatch.resolve_backend`` can say: it is given whichever of M, K, D it accepts
    (a size policy needs them). None if it cannot tell, e.g. when it requires other
    parameters that this function does not know how to fill."""
    try:
        params = inspect.signature(dispatch.resolve_backend).parameters
        sizes = {k: v for k, v in dict(M=shape.M, K=shape.K, D=shape.D).items() if k in params}
        positional = {n for n, p in params.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY}
        if positional - {"backend", "device", "rank", *sizes}:  # (keyword-only ones are options)
            return None
        return dispatch.resolve_backend(AUTO, device, rank=shape.r, **sizes)
    except Exception:  # a report detail: never fail the run over it
        return None


def rank_skip_reason(backend: str, shape: Shape) -> str | None:
    """Why backend ``backend`` is not timed at ``shape`` (its rank is past the backend's
    limit: ``auto`` picks another there), or None."""
    limit = None if backend == AUTO else dispatch._max_rank(backend)
    if limit is not None and shape.r > limit:
        return f"skipped: rank {shape.r} > {limit}, {backend}'s limit"
    return None


def official_skip_reason(shape: Shape, max_gflop: float | None) -> str | None:
    """Why the official baseline is not timed at ``shape`` (its dense rebuild is too
    costly), or None."""
    gflop = official_rebuild_flops(shape.D, shape.K, shape.rl) / 1e9
    if max_gflop is not None and gflop > max_gflop:
        return f"skipped: rebuild {gflop:.3g} > {max_gflop:g} GFLOP"
    return None


def build_methods(device, backends, official_max_gflop: float | None = None, *, auto: bool = False,
                  baselines=("dense", "official")) -> list[Method]:
    """Timed methods: ``auto`` (if asked), the given (verified) backends, then the
    baselines (``"dense"``, ``"official"``)."""
    names = ([AUTO] if auto else []) + [b for b in backends if not is_interpreted(b, device)]
    notes = {REFERENCE: "plain PyTorch chain", AUTO: "what backend='auto' runs"}
    methods = [Method(b, "salt", salt_inputs, _salt_forward(b), note=notes.get(b, ""),
                      skip_reason=lambda s, b=b: rank_skip_reason(b, s)) for b in names]
    if "dense" in baselines:
        methods.append(Method(DENSE, "baseline", _dense_inputs, dense_linear, note="full fine-tuning"))
    if "official" in baselines:
        methods.append(Method(OFFICIAL, "baseline", _official_inputs, official_salt_forward,
                              note="dense weight rebuilt from full SVD",
                              skip_reason=lambda s: official_skip_reason(s, official_max_gflop)))
    return methods


# Shapes with at most this many rows are timed as decode: on CUDA also back to back without
# the L2 flush and from a CUDA graph (timing.time_steps(back_to_back=True)), because at
# these sizes the host, not the GPU, can set the pace.
DECODE_MAX_M = 64


def is_decode(shape: Shape) -> bool:
    return shape.M <= DECODE_MAX_M


def make_input_sets(method: Method, shape: Shape, dtype, device, *, seed=0, target_bytes=None) -> list[Inputs]:
    """Several independent copies of the inputs, cycled through by the timed step, so
    that a small problem is not served from cache every call (up to 8 copies, enough to
    exceed ``target_bytes``: 64 MiB on CPU; one copy on CUDA, where ``do_bench`` flushes
    the L2 cache before every call). Drawn on the device."""
    device = torch.device(device)
    if target_bytes is None:
        target_bytes = 0 if device.type == "cuda" else 64 * 2 ** 20
    g = torch.Generator(device=device).manual_seed(seed)
    first = method.make_inputs(shape, dtype, device, g)
    n = max(1, min(8, math.ceil(target_bytes / max(first.nbytes(), 1))))
    return [first] + [method.make_inputs(shape, dtype, device, g) for _ in range(n - 1)]


def make_step(method: Method, sets: list[Inputs], mode: str, *, sync: bool = False) -> Callable[[], None]:
    """The timed callable: ``mode="fwd"`` runs the forward under ``no_grad``;
    ``"fwd+bwd"`` runs it with autograd and takes the gradients of every trainable
    input (``torch.autograd.grad``, so nothing accumulates between calls)."""
    return layer_step(method.forward, [(s.args, s.trainable, s.grad_out) for s in sets], mode, sync=sync)


def layer_step(forward: Callable, sets, mode: str, *, sync: bool = False) -> Callable[[], None]:
    """A timed step of any layer: ``forward(**args)`` over the ``(args, trainable,
    grad_out)`` triples in ``sets`` (cycled). ``args`` may also be a tuple (positional)."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode: expected 'fwd' or 'fwd+bwd', got {mode!r}")
    cycle = itertools.cycle(sets)

    def call(args):
        return forward(**args) if isinstance(args, dict) else forward(*args)

    def fwd():
        args, _, _ = next(cycle)
        with torch.no_grad():
            call(args)

    def fwd_bwd():
        args, trainable, grad_out = next(cycle)
        y = call(args)
        torch.autograd.grad(y, trainable, grad_out)

    step = fwd if mode == "fwd" else fwd_bwd
    if not sync:
        return step

    def synced():
        step()
        torch.cuda.synchronize()
    return synced
