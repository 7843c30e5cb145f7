"""The one place that chooses a backend, for every call of :func:`salt_kernels.salt_linear`,
plain or mixed-adapter.

A call is resolved from three things:

* the device of ``x`` and, for plain calls, the token count M: one policy table,
  :data:`AUTO_POLICY`, gives the ``auto`` order;
* what the call needs (:data:`NEEDS`): the plain forward, or a mixed-adapter forward
  without gradients, with gradients for x and the bank, or with gradients for U and V too;
* what each backend declares it implements (``salt_kernels.backends``: its functions,
  ``MULTI_BACKWARD``, rank limits).

The ``auto`` order per device:

* CUDA: ``triton`` -> ``cuda`` -> ``reference`` (a default, not yet measured on a GPU:
  the fused Triton kernels first; the ``cuda`` extension runs the chain on cuBLAS, so it
  is never far from ``reference`` and saves memory)
* CPU:  ``reference`` up to M = 1024 tokens, where both run the same GEMMs and the
  extension's fixed cost per call made it 0.90-0.98x the reference (measured); above,
  ``cpu`` -> ``reference`` (the extension's large outputs on huge pages, fewer passes
  over the M-sized tensors, its autograd in C++, Z saved instead of x)

The M rows were measured on plain calls: mixed-adapter calls use the device's last row
(the mixed-batch figures are measured at large M). A backend that does not implement
what a call needs (e.g. ``triton`` has no mixed backward) hands it to the next backend
of the order that does, ending at ``reference``; so does a backend asked for explicitly
in a mixed call (the documented fallback). Optional pieces (Triton, the compiled
extension) may be missing: ``auto`` then falls back and warns once per reason. An
explicitly requested backend that cannot run raises :class:`BackendUnavailableError`
saying why and how to get it.
"""

from __future__ import annotations

import importlib
import math
import warnings

import torch

from ..backends.core import constant_for_compile

# backend name -> module declaring it (imported lazily: optional pieces may be absent)
_BACKEND_MODULES = {
    "reference": "salt_kernels.backends.reference",
    "triton": "salt_kernels.backends.triton",
    "cuda": "salt_kernels.backends.extension",
    "cpu": "salt_kernels.backends.extension",
}

# The auto policy: device type -> rows (largest M the row covers, or None for any M;
# backends in order of preference). The first row whose bound covers M applies. Rows are
# filled from benchmark measurements, never guessed: salt-bench prints the rows a run
# supports (bench.measured_policy; the GPU check reports them for CUDA), and a test
# checks the CPU rows against docs/bench-cpu/auto-vs-reference. A device with one row
# never looks at M. Under torch.compile the last row
# applies whatever M is, so one graph serves every token count (dynamic shapes): a
# size-dependent row would otherwise specialise the graph on M.
AUTO_POLICY: dict[str, tuple[tuple[int | None, tuple[str, ...]], ...]] = {
    "cuda": ((None, ("triton", "cuda", "reference")),),  # GPU default until measured
    # salt-bench --presets auto-vs-reference, idle 2-core AMD EPYC, fp32, the three
    # shapes: cpu was 0.80-0.90x reference at M = 16, 0.95-0.99x forward at M = 256 and
    # 1024 (the same GEMMs plus its fixed cost per call); at M = 4096 0.99-1.22x forward,
    # 1.03-1.25x forward+backward.
    "cpu": ((1024, ("reference",)), (None, ("cpu", "reference"))),
}

# What a call needs from a backend.
PLAIN = "plain"  # salt_linear_2d: every backend has it, differentiable in every input
MIXED = "mixed"  # multi_linear_2d, no gradient needed
MIXED_BACKWARD = "mixed+backward"  # ... differentiable in x, the bank and the biases (MULTI_BACKWARD)
MIXED_BASIS_BACKWARD = "mixed+basis"  # ... and in U, V (MULTI_BASIS_BACKWARD)
NEEDS = (PLAIN, MIXED, MIXED_BACKWARD, MIXED_BASIS_BACKWARD)


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run on this machine or device."""


def auto_order(device_type: str, M: int | None = None) -> tuple[str, ...]:
    """The ``auto`` preference order for ``device_type`` at M tokens (None: the order
    used when M is unknown, i.e. the last row)."""
    rows = AUTO_POLICY.get(device_type, ((None, ("reference",)),))
    if M is not None:
        for bound, order in rows:
            if bound is None or M <= bound:
                return order
    return rows[-1][1]


def _policy_row(device_type: str, M=None, x=None) -> int:
    """Index of the AUTO_POLICY row for M tokens (or x's rows, counted only if needed);
    0 without looking at M when the device has one row; the last row for M=None and
    while torch.compile traces (M may be symbolic)."""
    rows = AUTO_POLICY.get(device_type, ())
    if len(rows) <= 1 or torch.compiler.is_compiling() or (M is None and x is None):
        return max(len(rows) - 1, 0)
    if M is None:
        M = math.prod(x.shape[:-1])
    return next(i for i, (bound, _) in enumerate(rows) if bound is None or M <= bound)


# --------------------------------------------------------------------------- declarations


def _module(name: str):
    try:
        return importlib.import_module(_BACKEND_MODULES[name]), None
    except ImportError as exc:  # Triton or the built extension missing
        return None, f"{type(exc).__name__}: {exc}"


def unavailable_reason(name: str, device) -> str | None:
    """None if backend ``name`` can run on ``device``; otherwise why not, and how to fix it."""
    device = torch.device(device)
    mod, err = _module(name)
    if mod is None:
        return f"the '{name}' backend could not be imported ({err})"
    return mod.availability(device, name)


def why_unavailable(backend: str, device="cpu") -> str | None:
    """Why ``backend`` cannot run on ``device`` (what is missing, and how to get it), or
    None if it can: the reason a backend is absent from :func:`available_backends`."""
    if backend not in _BACKEND_MODULES:
        raise ValueError(f"backend: expected one of {sorted(_BACKEND_MODULES)}, got {backend!r}")
    return unavailable_reason(backend, device)


def available_backends(device="cpu") -> list[str]:
    """Backends usable for tensors on ``device``, fastest first (the ``auto`` order,
    then any other backend that can run there, e.g. ``triton`` on CPU under
    ``TRITON_INTERPRET=1``). :func:`why_unavailable` says why one is missing."""
    device = torch.device(device)
    order = list(auto_order(device.type))
    order += [b for b in _BACKEND_MODULES if b not in order]
    return [b for b in order if unavailable_reason(b, device) is None]


def _implements(name: str, need: str, dtype: torch.dtype | None = None) -> bool:
    """Whether backend ``name`` (importable) declares what ``need`` asks for, for inputs of
    ``dtype`` (None: any dtype it serves)."""
    if need == PLAIN:
        return True
    mod = _module(name)[0]
    if not hasattr(mod, "multi_linear_2d"):
        return False
    if need == MIXED_BACKWARD and not getattr(mod, "MULTI_BACKWARD", False):
        return False
    if need == MIXED_BASIS_BACKWARD and not getattr(mod, "MULTI_BASIS_BACKWARD", False):
        return False
    served = getattr(mod, "MULTI_MAX_RANK", None)
    return served is None or (bool(served) if dtype is None else dtype in served)


def _max_rank(name: str, need: str = PLAIN, dtype: torch.dtype | None = None) -> int | None:
    """The largest rank backend ``name`` runs for ``need`` (``MAX_RANK``, or for mixed
    calls ``MULTI_MAX_RANK`` at ``dtype``), or None for no limit."""
    mod = _module(name)[0]
    limit = getattr(mod, "MAX_RANK", None)
    served = getattr(mod, "MULTI_MAX_RANK", None) if need != PLAIN else None
    if served:
        limit = max(served.values()) if dtype is None else served[dtype]
    return limit


# --------------------------------------------------------------------------- the resolver


def resolve_backend(backend: str, device, rank: int = 1, M: int | None = None, *, need: str = PLAIN,
                    dtype: torch.dtype | None = None) -> str:
    """The concrete backend that ``backend`` ("auto" or a name) runs on ``device`` for a
    layer of rank ``rank`` at M tokens (None: as under torch.compile), for a call that
    needs ``need`` (:data:`NEEDS`) with inputs of ``dtype`` (None: any)."""
    if need not in NEEDS:
        raise ValueError(f"need: expected one of {NEEDS}, got {need!r}")
    device_type = torch.device(device).type
    row = _policy_row(device_type, M) if need == PLAIN else _policy_row(device_type)
    return _pick(_candidates(backend, device_type, row, need, dtype), backend, rank)


def call_need(mixed: bool, x, U, V, trained: tuple) -> str:
    """What a call needs: :data:`PLAIN`, or for a mixed call whether autograd must reach
    ``trained`` (x's bank and biases; x itself is passed as ``x``) or U, V too."""
    if not mixed:
        return PLAIN
    if not torch.is_grad_enabled():
        return MIXED
    if U.requires_grad or V.requires_grad:
        return MIXED_BASIS_BACKWARD
    if x.requires_grad or any(t is not None and t.requires_grad for t in trained):
        return MIXED_BACKWARD
    return MIXED


def implementation(name: str, need: str):
    """The function of backend ``name`` that runs a call needing ``need`` (resolved
    already: cached with the candidates)."""
    return _IMPLS[name, need]


# The one cache: (backend, device type, policy row, need, dtype) -> candidates, and next to
# it the implementation of each candidate, so that a call looks up a function, never a
# module. The candidates depend only on that key and on what is installed, so they are
# cached and, for torch.compile, treated as a constant: Dynamo then never traces the
# imports and warnings below, and `fullgraph=True` holds. The rank is compared with the
# candidates' limits in traced code (_pick): under torch.compile a symbolic rank (U an
# input of a compiled function with dynamic=True) becomes a guard `rank <= limit` instead
# of failing the constant.
_RESOLVED: dict[tuple, tuple] = {}
_IMPLS: dict[tuple[str, str], object] = {}  # (backend name, need) -> its salt_linear_2d / multi_linear_2d
_warned: set[str] = set()


@constant_for_compile
def _candidates(backend: str, device_type: str, row: int = 0, need: str = PLAIN, dtype=None) -> tuple:
    key = (backend, device_type, row, need, dtype)
    if key not in _RESOLVED:
        _RESOLVED[key] = _candidates_uncached(backend, torch.device(device_type), row, need, dtype)
        for name, _ in _RESOLVED[key]:
            mod = _module(name)[0]
            _IMPLS[name, need] = mod.salt_linear_2d if need == PLAIN else mod.multi_linear_2d
    return _RESOLVED[key]


def _warn_once(reason: str, message: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(message, RuntimeWarning, stacklevel=7)


def _candidates_uncached(backend: str, device: torch.device, row: int, need: str, dtype) -> tuple:
    """((name, rank limit or None), ...): the backends to try, in order."""
    rows = AUTO_POLICY.get(device.type, ((None, ("reference",)),))
    order = rows[min(row, len(rows) - 1)][1]
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend='{backend}' is not available: {reason}")
        if need == PLAIN:
            return ((backend, _max_rank(backend)),)
        mod = _module(backend)[0]
        if not hasattr(mod, "multi_linear_2d"):
            missing = getattr(mod, "MULTI_MISSING", "not implemented")
            raise BackendUnavailableError(f"backend='{backend}' has no mixed-adapter kernels ({missing}); rebuild "
                                          "the extension or use backend='auto'")
        # what it does not implement of this call goes to the rest of the device's order
        order = (backend,) + tuple(b for b in order if b != backend)
    out = []
    for name in order:
        reason = unavailable_reason(name, device)
        if reason is not None:
            if backend == "auto":
                _warn_once(reason, f"salt_kernels: skipping backend '{name}' on {device.type}: {reason}. "
                                   f"Falling back to the next of {order}.")
            continue
        missing = getattr(_module(name)[0], "MULTI_MISSING", None) if need != PLAIN else None
        if missing is not None and backend == "auto":
            _warn_once(missing, f"salt_kernels: backend '{name}' has no mixed-adapter kernels ({missing}); "
                                f"falling back to the next of {order}.")
        if _implements(name, need, dtype):
            out.append((name, _max_rank(name, need, dtype)))
    if not any(name == "reference" for name, _ in out):
        out.append(("reference", None))
    return tuple(out)


def _pick(candidates: tuple, backend: str, rank) -> str:
    """The first candidate whose rank limit admits ``rank`` (over the limit under "auto"
    is by design, not a missing piece: no warning)."""
    for name, limit in candidates:
        if limit is None or rank <= limit:
            return name
    name, limit = candidates[0]
    raise ValueError(
        f"U: backend='{backend}' supports rank <= {limit}, got rank {rank}; "
        f"use backend='auto' to run larger ranks on another backend"
    )


def clear_backend_cache() -> None:
    """Forget resolved backends and the warnings given (e.g. after building the extension
    or setting TRITON_INTERPRET in a running process)."""
    _RESOLVED.clear()
    _IMPLS.clear()
    _warned.clear()
