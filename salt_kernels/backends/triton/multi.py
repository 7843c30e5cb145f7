"""The ``triton`` backend of mixed-adapter :func:`salt_kernels.salt_linear` (forward).

    Z = x V               the shared shrink: triton_kernels' shrink kernel, unchanged
    y = mix_a(Z) U^T + b  ``_multi_expand_kernel``: the gathered mix in the expand prologue

Segment-sorted tiles, not per-row (BGMV-style) core loads. Rows are sorted by adapter
(stable, on the device) and cut into tiles of at most BM rows of one adapter, so a
program loads one core (sigma_a, X_a, Y_a: r + 2 r r' numbers) per BM x BN output tile
and applies it with two tensor-core dots. Per-row core loads would read r + 2 r r'
numbers for every row and every column block: at r = 64, r' = 8 that is 4.3 KB a row,
three times a bf16 x row at K = 768, so the core traffic (even from L2) would exceed the
activations'. Sorted tiles divide it by BM; the cost is a sort of M int64 and at most
one partly filled tile per adapter present (the grid is sized for the worst case,
cdiv(M, BM) + A + 1 tiles, so no host synchronisation: tiles past the end exit early).

Inference only: the backend declares no mixed backward, so the dispatcher sends calls
that need gradients to the next backend of the device's order (the compiled C++ op,
which also serves CUDA, else the reference gather), and so it does for the dtypes and
ranks ``MULTI_MAX_RANK`` leaves out: fp64; r > 128; fp32 inputs with r > 64, whose
tf32x3 mix spilled registers at every tile size on sm_90. Under ``TRITON_INTERPRET=1``
the same kernels run on CPU tensors (tests).

``python -m salt_kernels.aot`` compiles the launches :func:`multi_launches` plans (both
dtypes at every padded rank served here, every bias mode) for sm_80 and sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import kernels as tk
from .kernels import _dot

# The ranks the kernels serve per input dtype (a dtype not listed, fp64, is not served).
MULTI_MAX_RANK = {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64}
_BN = 64


@triton.jit
def _multi_expand_kernel(
    z_ptr, stride_zm,  # Z (M, R) fp32, row-major
    perm_ptr, tile_start_ptr, tile_rows_ptr, tile_adapter_ptr,  # rows sorted by adapter; tiles
    sigma_ptr, stride_sa, base_sigma_ptr,  # (A, R) fp32; (R,) fp32 for adapter -1
    x_ptr, stride_xa, stride_xi, stride_xk,  # X (A, R, RL) fp32
    y_ptr, stride_ya, stride_yk, stride_yi,  # Y (A, RL, R) fp32
    u_ptr, stride_un, stride_ur,  # U (N, R)
    bias_ptr, stride_bias_a, stride_bias_n, base_bias_ptr,
    out_ptr, stride_om, stride_on,
    N, R, RL, scaling,
    BM: tl.constexpr, BN: tl.constexpr, R_PAD: tl.constexpr, RL_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, BANKED_BIAS: tl.constexpr, HAS_BASE_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, MIX_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Program (t, n): tile t (<= BM rows of one adapter a) times columns n-block of U^T.
    T = Z * sigma_a + s (Z Y_a^T) X_a^T in fp32 (BM x R_PAD), then out = T U^T + b_a.
    HBM traffic per program: Z rows BM*R*4 (gathered), core (R + 2*R*RL)*4, U BN*R*e,
    out BM*BN*e written once (rows scattered back to the caller's order)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_rows = tl.load(tile_rows_ptr + pid_t)
    if n_rows == 0:  # past the last tile (grid sized for the worst case)
        return
    start = tl.load(tile_start_ptr + pid_t)
    a = tl.load(tile_adapter_ptr + pid_t)
    offs_i = tl.arange(0, BM)
    mask_m = offs_i < n_rows
    rows = tl.load(perm_ptr + start + offs_i, mask=mask_m, other=0)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    offs_k = tl.arange(0, RL_PAD)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    mask_n = offs_n < N

    z = tl.load(z_ptr + rows[:, None] * stride_zm + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    is_base = a < 0
    a_safe = tl.maximum(a, 0).to(tl.int64)
    if is_base:
        sig = tl.load(base_sigma_ptr + offs_r, mask=mask_r, other=0.0)
    else:
        sig = tl.load(sigma_ptr + a_safe * stride_sa + offs_r, mask=mask_r, other=0.0)
    t = z * sig[None, :]
    # the low-rank term; masked to zero for base rows (no X Y) and padded r'
    core_mask = (offs_k < RL) & (a >= 0)
    yt = tl.load(y_ptr + a_safe * stride_ya + offs_r[:, None] * stride_yi + offs_k[None, :] * stride_yk,
                 mask=mask_r[:, None] & core_mask[None, :], other=0.0)  # Y_a^T (R_PAD, RL_PAD)
    xt = tl.load(x_ptr + a_safe * stride_xa + offs_k[:, None] * stride_xk + offs_r[None, :] * stride_xi,
                 mask=core_mask[:, None] & mask_r[None, :], other=0.0)  # X_a^T (RL_PAD, R_PAD)
    u = tl.dot(z, yt, input_precision=MIX_PRECISION)
    t += scaling * tl.dot(u, xt, input_precision=MIX_PRECISION)

    ut = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc = _dot(t.to(ut.dtype), ut, tl.zeros((BM, BN), dtype=tl.float32), PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        if BANKED_BIAS:
            if is_base:
                if HAS_BASE_BIAS:
                    acc += tl.load(base_bias_ptr + offs_n * stride_bias_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            else:
                acc += tl.load(bias_ptr + a_safe * stride_bias_a + offs_n * stride_bias_n, mask=mask_n,
                               other=0.0).to(tl.float32)[None, :]
        else:
            acc += tl.load(bias_ptr + offs_n * stride_bias_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def multi_block_m(R_PAD: int, elem: int) -> int:
    """Rows per tile: 64 for fp16/bf16 up to R_PAD 64, else 32; fp32 (tf32x3 keeps three
    copies of each mix operand) 16. Larger tiles spilled registers (ptxas, compiled
    ahead of time: 32 rows at R_PAD 16 on sm_80 with triton 3.9)."""
    if elem == 2:
        return 64 if R_PAD <= 64 else 32
    return 16


def _tiles(index: torch.Tensor, A: int, BM: int):
    """(perm, tile_start, tile_rows, tile_adapter) on the device, no host sync: rows
    sorted by adapter; tile j covers perm[start, start + rows) of adapter tile_adapter[j];
    cdiv(M, BM) + A + 1 tiles, unused ones with rows = 0."""
    M = index.numel()
    dev = index.device
    sorted_index, perm = torch.sort(index, stable=True)
    # Segment bounds by binary search in the sorted index (bincount would read the index's
    # min and max on the host: two syncs on CUDA, and no CUDA-graph capture).
    edges = torch.searchsorted(sorted_index, torch.arange(-1, A + 1, device=dev))  # slot 0: base rows (-1)
    seg_start, counts = edges[:-1], edges[1:] - edges[:-1]
    seg_tiles = (counts + BM - 1) // BM
    tiles_end = torch.cumsum(seg_tiles, 0)
    n_tiles = triton.cdiv(M, BM) + A + 1  # >= sum(seg_tiles) whatever the index
    j = torch.arange(n_tiles, device=dev)
    seg = torch.searchsorted(tiles_end, j, right=True)  # A + 1: past the last tile
    used = seg <= A
    seg = seg.clamp(max=A)
    k = j - (tiles_end[seg] - seg_tiles[seg])  # tile number within its segment
    start = seg_start[seg] + k * BM
    rows = torch.where(used, torch.clamp(counts[seg] - k * BM, max=BM), 0)
    return perm, start, rows, seg - 1, n_tiles


def multi_linear_2d(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling: float):
    """Traced (torch.compile, export) and under torch.func transforms: the op below. Eager:
    its body without the custom-op dispatch (tens of microseconds a call, as for the plain
    ops: kernels.salt_linear_2d)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return multi_forward(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling)
    return multi_forward_impl(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling)


# An op (opaque to torch.compile, planned at run time like the plain Triton ops); inference
# only: the dispatcher sends calls that need gradients to another backend.
@torch.library.custom_op("salt_triton::multi_forward", mutates_args=())
def multi_forward(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, sigma: torch.Tensor, X: torch.Tensor,
                  Y: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, base_sigma: torch.Tensor | None,
                  base_bias: torch.Tensor | None, scaling: float) -> torch.Tensor:
    return multi_forward_impl(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling)


def multi_forward_impl(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling: float) -> torch.Tensor:
    """The body of ``multi_forward`` and of the eager path."""
    if x.shape[0] == 0:
        return x.new_empty((0, U.shape[0]))
    if x.shape[1] == 0 or U.shape[0] == 0:  # nothing for a kernel to do
        return reference.multi_linear_2d(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling)
    with tk._device_guard(x.device):
        y, launches = multi_launches(x, tk.basis_for_kernels(U), tk.basis_for_kernels(V), sigma, X, Y, bias,
                                     index, base_sigma, base_bias, scaling)
        tk._run(launches, x.device)
    return y


@multi_forward.register_fake
def _(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling):
    return x.new_empty((x.shape[0], U.shape[0]))


def multi_launches(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling: float):
    """Allocate y (M, D) and plan the launches (the shared unsplit shrink, then the
    gathered-mix expand), for M, K, D >= 1: the launcher's and aot.py's one source of
    launch arguments."""
    M, K = x.shape
    D, r = U.shape
    A, rl = sigma.shape[0], X.shape[2]
    dev = x.device
    elem = x.element_size()
    R_PAD, _ = tk.rank_tiles(r)
    y = torch.empty(M, D, dtype=x.dtype, device=dev)
    RL_PAD = max(16, triton.next_power_of_2(max(rl, 1)))
    # the shared shrink, unsplit: Z (M, r) fp32
    Z = torch.empty(M, r, dtype=torch.float32, device=dev)
    BM_s = tk.block_m(M, R_PAD, elem)
    aligned = tk.rank_aligned(r, V)
    shrink = tk._spec("shrink", tk._shrink_kernel, lambda meta: (triton.cdiv(M, BM_s), 1),
                      dict(BM=BM_s, R_PAD=R_PAD, NEED_ACC=True, COLSUM=False, PRECISION=tk._precision(x.dtype),
                           UPCAST_DOT=tk._upcast_dot(x.dtype)),
                      tk.usable_configs("shrink", BM_s, R_PAD, elem, aligned=aligned)
                      ).bind((x, x.stride(0), x.stride(1), V, V.stride(0), V.stride(1), Z, Z,
                              M, K, r, K, tk._bucket(M), tk._bucket(K), int(aligned)))
    BM = multi_block_m(R_PAD, elem)
    perm, t_start, t_rows, t_adapter, n_tiles = _tiles(index, A, BM)
    sigma_f, X_f, Y_f = sigma.to(torch.float32).contiguous(), X.to(torch.float32), Y.to(torch.float32)
    base_f = sigma_f[0] if base_sigma is None else base_sigma.to(torch.float32).contiguous()  # read by -1 rows only
    if base_bias is not None and bias is not None:
        bias, base_bias = bias.contiguous(), base_bias.contiguous()  # one column stride for both (D-sized)
    banked = bias is not None and bias.dim() == 2
    b = y if bias is None else bias
    expand = tk._spec(
        "multi_expand", _multi_expand_kernel, lambda meta: (n_tiles, triton.cdiv(D, _BN)),
        dict(BM=BM, BN=_BN, R_PAD=R_PAD, RL_PAD=RL_PAD, HAS_BIAS=bias is not None, BANKED_BIAS=banked,
             HAS_BASE_BIAS=base_bias is not None, PRECISION=tk._precision(x.dtype),
             MIX_PRECISION=tk._mix_precision(x.dtype), UPCAST_DOT=tk._upcast_dot(x.dtype)),
        tk._fixed(4)).bind((
         Z, Z.stride(0), perm, t_start, t_rows, t_adapter,
         sigma_f, sigma_f.stride(0), base_f,
         X_f, X_f.stride(0), X_f.stride(1), X_f.stride(2),
         Y_f, Y_f.stride(0), Y_f.stride(1), Y_f.stride(2),
         U, U.stride(0), U.stride(1),
         b, b.stride(0) if banked else 0, b.stride(-1) if bias is not None else 0,
         y if base_bias is None else base_bias,
         y, y.stride(0), y.stride(1), D, r, rl, float(scaling)))
    return y, [shrink, expand]
