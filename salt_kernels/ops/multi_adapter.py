"""Mixed-adapter batches, :func:`salt_kernels.salt_linear` with ``adapter_index``: their validation.

Every SALT adapter of one base shares ``U``, ``V``; an adapter is only its core
``C_a = diag(sigma_a) + s X_a Y_a``. A batch whose row ``m`` uses adapter
``a = adapter_index[m]`` costs one shared shrink GEMM, a per-row mix and one shared
expand GEMM (docs/design.md, "Many adapters on one base")::

    Z = x V;   T[m] = Z[m] * sigma_a + s (Z[m] Y_a^T) X_a^T;   y = T U^T + b_a

Arguments (validated here, before any backend runs):

* ``sigma (A, r)``, ``X (A, r, r')``, ``Y (A, r', r)``: the bank of ``A >= 1`` adapters.
* ``bias``: ``(D,)`` shared by every row, ``(A, D)`` one per adapter, or None.
* ``adapter_index``: int64 on x's device, shape ``x.shape[:-1]`` or ``(M,)`` with ``M``
  the number of rows of x's flattened leading dims; values in ``[0, A)``, or ``-1`` for
  the base layer.
* ``base_sigma (r,)``: the core of ``-1`` rows, ``diag(base_sigma)`` with no ``X Y``
  term (for a converted layer: its ``sigma0``, the pretrained singular values). Required
  when any row is ``-1``.
* ``base_bias (D,)``: the bias of ``-1`` rows when ``bias`` is banked ``(A, D)`` (None:
  no bias on those rows). With a shared ``(D,)`` bias every row, ``-1`` included, uses it.

The range of ``adapter_index`` is checked on every call: free on CPU, one device-to-host
synchronisation on CUDA (the forwards themselves read nothing on the host; the C++
backward reads the adapter segments there). ``check_range=False`` skips it (the
model-level :func:`salt_kernels.adapters` block does, its index is built from checked
names). Inside ``torch.compile`` and during CUDA-graph capture the check is a device-side
assert instead.

Backends (each declares what it implements; :mod:`.dispatch` picks): ``reference``
gathers each row's core (plain PyTorch, every gradient); ``cpu`` and ``cuda`` run the
compiled ``salt_multi_forward`` / ``salt_multi_backward`` (gradients for x, the bank and
the biases); ``triton`` fuses the gathered mix into the expand kernel (forward only:
calls that need gradients run on the next backend of the device's order, the C++ op). A
basis ``U`` / ``V`` that requires grad runs on ``reference`` (the kernels assume a frozen
basis, as every SALT layer has).

This module holds the validation; the call itself is :func:`salt_kernels.salt_linear`
(:mod:`.linear`), and the reference math is ``salt_kernels.backends.reference``.
"""

from __future__ import annotations

import torch

from .validate import _check_shape, _check_tensor, validate_salt_args


def validate_multi_args(x, U, V, sigma, X, Y, bias, scaling, backend, adapter_index, base_sigma,
                        base_bias, *, check_range: bool = True) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless the arguments describe a valid bank
    and index (module docstring); every error names the argument."""
    _check_tensor("sigma", sigma)
    if sigma.dim() != 2 or sigma.shape[0] < 1:
        raise ValueError(f"sigma: with adapter_index, expected a bank of shape (num_adapters, rank) with "
                         f"num_adapters >= 1, got shape {tuple(sigma.shape)}")
    A = sigma.shape[0]
    for name, t in (("X", X), ("Y", Y)):
        _check_tensor(name, t)
        if t.dim() != 3 or t.shape[0] != A:
            what = "(num_adapters, rank, lora_rank)" if name == "X" else "(num_adapters, lora_rank, rank)"
            raise ValueError(f"{name}: with adapter_index, expected shape {what} with num_adapters = {A} "
                             f"(from sigma), got {tuple(t.shape)}")
    banked_bias = bias is not None and isinstance(bias, torch.Tensor) and bias.dim() == 2
    if banked_bias:
        _check_tensor("bias", bias)
        _check_shape("bias", bias, (A, U.shape[0] if U.dim() == 2 else -1),
                     "= (num_adapters, out_features) or (out_features,)")
    # Everything per adapter is now one slice of the bank: the single-adapter checks
    # cover x, U, V, the slices' shapes, dtypes and devices.
    validate_salt_args(x, U, V, sigma[0], X[0], Y[0], bias[0] if banked_bias else bias, scaling, backend)
    D, r = U.shape
    if base_sigma is not None:
        _check_tensor("base_sigma", base_sigma, 1)
        _check_shape("base_sigma", base_sigma, (r,), "= (rank,)")
        if base_sigma.device != x.device:
            raise ValueError(f"base_sigma: expected a tensor on x's device {x.device}, got {base_sigma.device}")
    if base_bias is not None:
        if not banked_bias:
            raise ValueError("base_bias: only meaningful with a per-adapter bias of shape (num_adapters, "
                             "out_features); a shared bias (out_features,) already applies to base rows")
        _check_tensor("base_bias", base_bias, 1)
        _check_shape("base_bias", base_bias, (D,), "= (out_features,)")
        if base_bias.device != x.device or base_bias.dtype != x.dtype:
            raise TypeError(f"base_bias: expected a {x.dtype} tensor on {x.device} (x's), got "
                            f"{base_bias.dtype} on {base_bias.device}")
    check_adapter_index(adapter_index, x, A, base_sigma is not None, check_range=check_range)


def _capturing(x) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_adapter_index(adapter_index, x, num_adapters: int, allow_base: bool, *, check_range: bool = True) -> None:
    """Type, dtype, device, shape and (``check_range``) value range of ``adapter_index``."""
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index: expected an int64 torch.Tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype != torch.int64:
        raise TypeError(f"adapter_index: expected dtype torch.int64, got {adapter_index.dtype}")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index: expected a tensor on x's device {x.device}, got {adapter_index.device}")
    lead = tuple(x.shape[:-1])
    M = x.numel() // x.shape[-1] if x.shape[-1] else int(torch.Size(lead).numel())
    if tuple(adapter_index.shape) not in (lead, (M,)):
        raise ValueError(f"adapter_index: expected one index per row of x, shape {lead} or ({M},), "
                         f"got {tuple(adapter_index.shape)}")
    if not check_range or adapter_index.numel() == 0:
        return
    low = -1 if allow_base else 0
    if torch.compiler.is_compiling() or _capturing(x):
        # Traced, or a CUDA graph being captured: no host read of the values (it would break
        # the graph, or fail the capture); the check runs on the device (a CUDA device
        # assert, a RuntimeError on CPU).
        torch._assert_async(((adapter_index >= low) & (adapter_index < num_adapters)).all(),
                            f"adapter_index: expected values in [{low}, {num_adapters})")
        return
    lo, hi = (int(v) for v in torch.aminmax(adapter_index))  # one host sync on CUDA
    if lo < low or hi >= num_adapters:
        bad = lo if lo < low else hi
        base = "" if allow_base else " (-1, the base layer, needs base_sigma)"
        raise ValueError(f"adapter_index: expected values in [{low}, {num_adapters}) for {num_adapters} "
                         f"adapters{base}, got {bad}")
