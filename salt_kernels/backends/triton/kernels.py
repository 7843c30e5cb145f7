"""The ``triton`` backend: fused Triton kernels for the SALT forward and backward.

    forward   Z = x V (shrink)   T = Z C^T (mix)   y = T U^T + b (expand)
    backward  dT = G U (shrink)  dZ = dT C (mix)   dx = dZ V^T (expand)
              dC = dT^T Z, db = sum_rows G (fixed-order partial sums)

The same kernels serve both directions, because the backward is the forward's shape
with (x, V, C^T, U) replaced by (G, U, C, V):

* ``_shrink_kernel``: A (M x N) @ B (N x r), the r-wide accumulator in fp32 registers,
  written as fp32 partials; at small M split over N across programs.
* ``_mix_kernel`` (r > 64 only): sums the partials in fixed order and multiplies by the
  r x r core; in the backward also the per-row-block partials of dC = dT^T Z.
* ``_expand_kernel``: (mixed r-wide rows) @ B^T (r x N), bias as epilogue; for r <= 64
  the mix (and Z / dC partials) run in its prologue instead of a separate kernel.
* ``_sum_partials_kernel``: dC and db from their per-row-block partials, in fixed order.

What is fused is chosen by problem size (see :func:`_plan` and :func:`forward_launches`):

* small M, e.g. decode M = 1..64: cdiv(M, BM) is 1..4 programs, far too few to stream
  V (K x r) at bandwidth, so the shrink is split over K into S deterministic fp32
  partials (parallelism S x cdiv(M, BM)); the expand has cdiv(M, BM) x cdiv(D, BN)
  programs. At large M, cdiv(M, BM) fills the GPU and S = 1 (no partial traffic).
* r <= 64: the mix costs BM x 64 x 64 per expand tile, small next to its BM x BN x 64
  expand, so it rides in the expand prologue (two launches, no mixed-rows round trip).
* r > 64: the mix gets its own small kernel, because Triton cannot slice a register
  tile: fused, the whole BM x 256 fp32 tile is one dot operand, which spilled
  (measured with aot.py). It costs one launch and M x r x 4 bytes written and read.

Why no single fully fused kernel (shrink + mix + loop over all of D per program): it
launches only cdiv(M, BM) programs, which starves the GPU at small M (docs/design.md,
"Kernel plan"), and at any M it must hold the BM x r fp32 rows live across the whole D
loop as a dot operand, the register problem above. The split design's extra traffic is
the r-wide fp32 rows, r*4*(2 + S) / (e*(K + D)) of the x/y traffic: ~3% at K = D = 4096,
r = 64, bf16, S = 1.

Numerics: every accumulator is fp32. Half-precision inputs feed the tensor cores
directly (the mixed rows are rounded to the input dtype just before the expand dot,
as cuBLAS would for a bf16 T); fp32 inputs use ``input_precision="tf32x3"`` (three
TF32 MMAs, ~fp32 accuracy: the fp32 tolerance in tests/salt_testing.py is 2e-5,
which plain TF32's ~1e-3 would miss). The r x r mix and dC run on fp32 operands:
tf32x3 for fp32 inputs, one TF32 pass for fp16/bf16 (see ``_mix_precision``).
fp64 inputs (gradcheck) are computed with plain torch ops inside the op.

Determinism. The reduction order does not depend on the autotune outcome or on the
GPU's SM count: the split count S and its column ranges are functions of (M, K) only
(a fixed program target, not the device's SM count); the shrink autotunes only its
pipeline depth, with the reduction tile (BN) and warps (the layout of db's in-tile
column sums) fixed per (dtype size, rank range); the expand's tile choices do not
reduce; dC and db are summed from per-row-block partials, whose row blocks are fixed by
the host, in row-block order by ``_sum_partials_kernel`` (not torch's sum, whose split
depends on the device). So results are bitwise identical run to run, process to
process, whichever config the autotuner picks, on any GPU of one architecture with one
Triton version. Across architectures the tensor-core instructions differ, so results
agree to rounding only. tests/test_triton.py checks the config- and SM-independence
under the interpreter.

Tracing. The ops are ``torch.library.custom_op``s with fake kernels and registered
autograd, opaque to ``torch.compile``: the fake kernels give output shapes in terms of
the (possibly symbolic) token count M and never look at its value, and the real body
plans and launches at run time with concrete sizes. (A ``triton_op`` would have its
body traced, so the launch planner's ``cdiv(M, BM)``, size buckets and split choice
would specialise the graph on M: one recompile per sequence length.) The cost is that
Inductor cannot fuse into the kernels, which it would not do with these anyway.

Devices, streams and CUDA graphs. Every launch runs under ``torch.cuda.device`` of the
inputs' device, so Triton launches on that device's current stream (with x on cuda:1
while cuda:0 is current, the kernels run on cuda:1's stream). While the current stream
is capturing a CUDA graph, nothing may autotune or compile: a launch whose autotune key
or specialisation is not cached raises :class:`NotWarmedUpError`, telling the user to
call :func:`salt_kernels.warmup` first.

Under ``TRITON_INTERPRET=1`` (tests without a GPU) the same kernels run on CPU
tensors. The interpreter's ``tl.dot`` is wrong on bfloat16 operands (triton issue
11584), so there only, bf16 dot operands are upcast to fp32 first (``UPCAST_DOT``);
bf16 x bf16 products are exact in fp32, so the math is unchanged.

Autotuning: two or three configs per (kernel, dtype size, rank range) in
``_CONFIG_TABLE`` (``_UNALIGNED_CONFIGS`` replaces some where r is not a multiple of
16), keyed on power-of-two buckets of M and N, the padded rank and that alignment.
``SALT_KERNELS_AUTOTUNE=0`` (and the interpreter) use the first config of the entry.
Every launch is described by a :class:`Launch` (kernel, grid, arguments, candidate
configs) built by :func:`forward_launches` / :func:`backward_launches`; the ops run
them, and ``python -m salt_kernels.aot`` compiles exactly their specialisations.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple
import os

import torch
import triton
import triton.language as tl

from ..autograd import register_salt_autograd, run_salt_op

# Read once, like triton itself: the variable must be set before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
AUTOTUNE = os.environ.get("SALT_KERNELS_AUTOTUNE", "1") not in ("", "0") and not INTERPRET

# fp32 dot precision: see the module docstring.
FP32_PRECISION = "tf32x3"
MAX_RANK = 256
# Split-N tuning (small M): aim for this many programs (2 per SM on a 132-SM GPU), each
# reading >= _SPLIT_MIN_N columns of A. A constant, not the device's SM count: the split
# sets the reduction order, which must be the same on every GPU.
_SPLIT_PROGRAMS = 264
_SPLIT_MIN_N = 256
# Split ranges are whole multiples of this many columns, so that the shrink's K tiles
# (BN <= 64, a divisor of it) line up with the split boundaries for every config.
_SPLIT_ALIGN = 64
# Tests set this to force the split / unsplit path on small shapes (None: by size).
FORCE_SPLIT: int | None = None
# Sizes and loop counts are not specialised (no ==1 / divisible-by-16 variants): they
# only bound loops and masks. Strides are: stride 1 and 16-divisible strides vectorise.
_SIZES = ["M", "N", "R", "n_per_split", "SPLIT", "M_BUCKET", "N_BUCKET", "R_ALIGNED", "P", "L"]


def availability(device: torch.device, backend: str) -> str | None:
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu" and INTERPRET:
        return None
    return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)"


def _jit(fn):
    return triton.jit(fn, do_not_specialize=[n for n in _SIZES if n in fn.__code__.co_varnames[:fn.__code__.co_argcount]])


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b. UPCAST_DOT: interpreter only, bf16 tl.dot is broken there (issue 11584)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _sum_splits(p_ptr, split_stride, SPLIT, offs_m, mask_m, offs_r, mask_r, R,
                BM: tl.constexpr, BR: tl.constexpr):
    """Rows offs_m, columns offs_r of sum_s partials[s] (fp32 (SPLIT, M, R) contiguous),
    summed in split order: deterministic."""
    rows = tl.zeros((BM, BR), dtype=tl.float32)
    ptrs = p_ptr + offs_m[:, None] * R + offs_r[None, :]
    for _ in range(SPLIT):
        rows += tl.load(ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        ptrs += split_stride  # 64-bit pointer arithmetic: no int32 overflow
    return rows


@_jit
def _shrink_kernel(
    a_ptr, stride_am, stride_an,  # A (M, N): x (forward) or G (backward), any strides
    b_ptr, stride_bn, stride_br,  # B (N, R): V (forward) or U (backward)
    out_ptr,  # fp32 (SPLIT, M, R) contiguous: this split's partial of A @ B
    colsum_ptr,  # COLSUM: fp32 (cdiv(M, BM), N) column sums of A per row block (db)
    M, N, R, n_per_split,
    M_BUCKET, N_BUCKET, R_ALIGNED,  # autotune key only
    BM: tl.constexpr, BN: tl.constexpr, R_PAD: tl.constexpr,
    NEED_ACC: tl.constexpr, COLSUM: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Program (m, s): rows [m*BM, (m+1)*BM) of A[:, n-range s] @ B[n-range s, :], with
    the r-wide accumulator in fp32 registers for the whole N loop.

    HBM traffic (element size e, S splits, P = cdiv(M, BM)):
      read  A: M*N*e (each element once)   B: P*N*R*e (once per row block; L2 absorbs
            the repeats when P is large, and P is small exactly when S > 1)
      write S*M*R*4 (partials; S = 1 at large M)   COLSUM: P*N*4
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    n_start = pid_s.to(tl.int64) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)

    acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for n0 in range(n_start, n_end, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < n_end
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if COLSUM:  # each (row block, column) belongs to exactly one program: no atomics
            tl.store(colsum_ptr + pid_m.to(tl.int64) * N + offs_n,
                     tl.sum(a.to(tl.float32), axis=0), mask=mask_n)
        if NEED_ACC:
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            acc = _dot(a, b, acc, PRECISION, UPCAST_DOT)
    if NEED_ACC:
        part_ptr = out_ptr + pid_s.to(tl.int64) * M * R
        tl.store(part_ptr + offs_m[:, None] * R + offs_r[None, :], acc,
                 mask=mask_m[:, None] & mask_r[None, :])


@_jit
def _mix_kernel(
    p_ptr, split_stride, SPLIT,  # fp32 partials (SPLIT, M, R) of Z (forward) or dT (backward)
    cm_ptr, stride_ci, stride_cj,  # core as applied on the right: C^T (forward) or C (backward)
    z_ptr, stride_zm, stride_zr,  # forward: Z out (STORE_Z); backward: Z in (DC)
    dc_ptr,  # DC: fp32 (cdiv(M, BM), R, R) per-row-block partials of dC = dT^T Z
    out_ptr,  # STORE_MIX: fp32 (M, R) = rows @ Cm
    M, R,
    BM: tl.constexpr, R_PAD: tl.constexpr, BR: tl.constexpr,
    STORE_Z: tl.constexpr, DC: tl.constexpr, STORE_MIX: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (m, j): BR columns j of the r-wide rows times the core, for r > 64.

    A separate kernel because Triton cannot slice a register tile: fusing an r = 256 mix
    into the shrink or expand needs the whole BM x 256 fp32 tile as one dot operand,
    which spilled (measured with aot.py). Here each operand is a BM x BR slice loaded
    from the (L2-resident) partials.

    HBM traffic: read SPLIT*M*R*4 (times R_PAD/BR programs along j, L2 hits) + R*R*4,
    write M*R*4 (+ M*R*4 for Z when STORE_Z) (+ P*R*R*4 for DC).
    """
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_j = pid_j * BR + tl.arange(0, BR)
    mask_j = offs_j < R
    mixed = tl.zeros((BM, BR), dtype=tl.float32)
    if DC:
        z_j = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_j[None, :] * stride_zr,
                      mask=mask_m[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
    for i0 in range(0, R, BR):
        offs_i = i0 + tl.arange(0, BR)
        mask_i = offs_i < R
        rows_i = _sum_splits(p_ptr, split_stride, SPLIT, offs_m, mask_m, offs_i, mask_i, R, BM, BR)
        if STORE_MIX:
            cm = tl.load(cm_ptr + offs_i[:, None] * stride_ci + offs_j[None, :] * stride_cj,
                         mask=mask_i[:, None] & mask_j[None, :], other=0.0)
            mixed = tl.dot(rows_i, cm, mixed, input_precision=PRECISION)
        if DC:
            dc = tl.dot(tl.trans(rows_i), z_j, input_precision=PRECISION)
            tl.store(dc_ptr + pid_m.to(tl.int64) * R * R + offs_i[:, None] * R + offs_j[None, :], dc,
                     mask=mask_i[:, None] & mask_j[None, :])
    if STORE_Z:
        rows_j = _sum_splits(p_ptr, split_stride, SPLIT, offs_m, mask_m, offs_j, mask_j, R, BM, BR)
        tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_j[None, :] * stride_zr, rows_j,
                 mask=mask_m[:, None] & mask_j[None, :])
    if STORE_MIX:
        tl.store(out_ptr + offs_m[:, None] * R + offs_j[None, :], mixed,
                 mask=mask_m[:, None] & mask_j[None, :])


@_jit
def _expand_kernel(
    p_ptr, split_stride, SPLIT,  # PROLOGUE_MIX: fp32 partials (SPLIT, M, R); else mixed rows (M, R) fp32
    cm_ptr, stride_ci, stride_cj,  # core as applied on the right (PROLOGUE_MIX only)
    z_ptr, stride_zm, stride_zr,  # forward: Z out (STORE_Z); backward: Z in (DC)
    dc_ptr,  # DC: fp32 (cdiv(M, BM), R, R)
    b_ptr, stride_bn, stride_br,  # B (N, R): U (forward) or V (backward); out = mixed @ B^T
    bias_ptr, stride_bias,
    out_ptr, stride_om, stride_on,
    M, N, R,
    M_BUCKET, N_BUCKET, R_ALIGNED,  # autotune key only
    BM: tl.constexpr, BN: tl.constexpr, R_PAD: tl.constexpr, BR: tl.constexpr,
    PROLOGUE_MIX: tl.constexpr, STORE_Z: tl.constexpr, DC: tl.constexpr,
    COMPUTE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, MIX_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Program (m, n): out[m-block, n-block] = mixed @ B[n-block]^T (+ bias epilogue).

    PROLOGUE_MIX (r <= 64, R_PAD == BR): the program sums the shrink's split partials and
    applies the core itself (BM x 64 x 64, small next to its BM x BN x 64 expand), so no
    mix kernel and no mixed-rows round trip; column-block 0 also writes Z / dC partials.

    HBM traffic (element size e, P = cdiv(M, BM), Q = cdiv(N, BN)):
      read  B: P*N*R*e (L2 absorbs repeats)   rows: Q*SPLIT*M*R*4 (L2 hits after the first)
      write out: M*N*e, exactly once (bias fused: y is never re-read)
            STORE_Z: M*R*4   DC: P*R*R*4 (+ read Z M*R*4)
    At r << N the r-wide reads are a few percent of out: the kernel streams out at bandwidth.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    mask_n = offs_n < N

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if PROLOGUE_MIX:
        tl.static_assert(R_PAD == BR)
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        rows = _sum_splits(p_ptr, split_stride, SPLIT, offs_m, mask_m, offs_r, mask_r, R, BM, R_PAD)
        if pid_n == 0:  # one program per row block writes the row-block-wide results
            if STORE_Z:
                tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_r[None, :] * stride_zr,
                         rows, mask=mask_m[:, None] & mask_r[None, :])
            if DC:
                z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_r[None, :] * stride_zr,
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
                dc = tl.dot(tl.trans(rows), z, input_precision=MIX_PRECISION)
                tl.store(dc_ptr + pid_m.to(tl.int64) * R * R + offs_r[:, None] * R + offs_r[None, :],
                         dc, mask=mask_r[:, None] & mask_r[None, :])
        if COMPUTE_OUT:
            cm = tl.load(cm_ptr + offs_r[:, None] * stride_ci + offs_r[None, :] * stride_cj,
                         mask=mask_r[:, None] & mask_r[None, :], other=0.0)
            mixed = tl.dot(rows, cm, input_precision=MIX_PRECISION)
            bt = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = _dot(mixed.to(bt.dtype), bt, acc, PRECISION, UPCAST_DOT)
    else:
        for j0 in range(0, R, BR):
            offs_j = j0 + tl.arange(0, BR)
            mask_j = offs_j < R
            mixed = tl.load(p_ptr + offs_m[:, None] * R + offs_j[None, :],
                            mask=mask_m[:, None] & mask_j[None, :], other=0.0)
            bt = tl.load(b_ptr + offs_j[:, None] * stride_br + offs_n[None, :] * stride_bn,
                         mask=mask_j[:, None] & mask_n[None, :], other=0.0)
            # rounded to the input dtype for the tensor cores, as cuBLAS would for a bf16 T
            acc = _dot(mixed.to(bt.dtype), bt, acc, PRECISION, UPCAST_DOT)

    if COMPUTE_OUT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@_jit
def _sum_partials_kernel(p_ptr, P, L, out_ptr, BLOCK: tl.constexpr):
    """out[l] = sum_p partials[p, l] for fp32 (P, L) contiguous partials, added in order
    p = 0, 1, ... (``_sum_splits`` on a one-row tile): the same order on every GPU."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    row = tl.zeros((1,), dtype=tl.int64)
    total = _sum_splits(p_ptr, L, P, row, row == 0, offs, mask, L, 1, BLOCK)
    tl.store(out_ptr + offs[None, :], total.to(out_ptr.dtype.element_ty), mask=mask[None, :])


# ---------------------------------------------------------------------------------------
# Autotune configs. BM is chosen on the host (partial buffers are sized by it); the
# configs choose the streamed tile (BN), warps and pipeline depth. The first config of
# each list is the default used when autotuning is off.
# ---------------------------------------------------------------------------------------

def _cfg(BN, warps, stages=3):
    return triton.Config({"BN": BN}, num_warps=warps, num_stages=stages)


def _depths(BN, warps, stages=(3, 4)):
    """Shrink candidates: one reduction tile BN and one warp layout (which fix the order
    of the K reduction and of db's in-tile column sums), several pipeline depths (which
    do not change the arithmetic)."""
    return [_cfg(BN, warps, s) for s in stages]


# (kernel, element size, R_PAD range) -> configs, best-first (the first is the default).
# Chosen so that every one compiles without spills and with register headroom for sm_80
# and sm_90 on every supported Triton (aot.py checks): wide ranks get a narrower streamed
# tile (BN) or more warps, because Triton keeps a whole BN x R_PAD dot operand in
# registers on sm_80. Lists are searched in order, so narrow rank buckets come first.
_CONFIG_TABLE = {
    ("shrink", 2, 32): _depths(64, 4),
    ("shrink", 2, 64): _depths(64, 8),  # 4 warps spilled with db on sm_90 at 2-4 stages (triton 3.8)
    ("shrink", 2, 128): _depths(32, 8),  # 4 warps: 255 registers on sm_80 (triton 3.6)
    ("shrink", 2, 256): _depths(32, 8),
    # fp32 (tf32x3), r <= 64: 16 x 8 warps. At 16 x 4 and 32 x 4/8 some depth put 8-36 B
    # in local memory on sm_80 or sm_90 with triton 3.8 or 3.9; at r <= 32 so does 16 x 8
    # at 3 stages (triton 3.9).
    ("shrink", 4, 32): _depths(16, 8, (2,)),
    ("shrink", 4, 64): _depths(16, 8, (3, 2)),
    ("shrink", 4, 256): _depths(16, 16, (2,)),  # 3 stages spilled at 8 and 16 warps (triton 3.6, sm_90)
    # r <= 16: 64 x 4 and 256 x 8 put 16-40 B in local memory on sm_80 at any depth (triton 3.8).
    # With odd sizes (rows not 16-aligned, aot.py --full) 256 x 4 (r <= 16) and 256 x 8
    # (r <= 32) on sm_90 and 64 x 4 (r <= 64) on sm_80 spilled or hit 255 registers (triton 3.6).
    ("expand", 2, 16): [_cfg(128, 8), _cfg(64, 8)],
    ("expand", 2, 64): [_cfg(128, 8)],
    ("expand", 2, 128): [_cfg(128, 8), _cfg(64, 8)],
    ("expand", 2, 256): [_cfg(128, 8), _cfg(64, 4)],  # (256 x 8: > 240 registers on sm_80, triton 3.6)
    # fp32 (tf32x3 keeps three copies of each operand): 64 x 4 warps and 32 x 4 sat at
    # 255 registers and 32 x 8 spilled on sm_90 (triton 3.9): one config.
    ("expand", 4, 32): [_cfg(32, 4)],  # 64 x 8 spilled on sm_80 at r <= 32 (triton 3.8)
    ("expand", 4, 256): [_cfg(64, 8)],
}
# Ranks that are not a multiple of 16 (e.g. r = 1, 33 or 200; see rank_aligned): the rows
# of U/V, Z, the core and the partials lose Triton's divisibility-16 hint, so U/V loads
# are no longer vectorised (one address per element). These entries replace their
# bucket's configs there. Each is clean on sm_80 and sm_90 with triton 3.6, 3.8 and 3.9
# (aot.py, odd-rank scenarios), where the bucket's own configs were not: bf16 shrink 64 x 4
# (r <= 32: 241-255 registers with 3.6, 12 B spilled on sm_90 with 3.9; 64 x 8 spilled
# 24 B with 3.6); fp32 shrink 16 x 8 at any depth (r <= 32: 8-12 B at 1, 2 or 3 stages on
# one Triton or another; r <= 64: 12-24 B at 1, 2 or 3 stages); bf16 expand 128 x 8 (r <= 16:
# 16 B on sm_80; r <= 64: 254 registers with 3.6; r <= 128: 255 registers or 12-36 B, and
# 64 x 8 251 registers at 64 rows; r <= 256: 255, and 64 x 4 up to 244 B); fp32 expand
# 32 x 4 at r <= 32 (12 B on sm_90 with 3.9; 32 x 8 spilled 24 B with 3.6, 16 x 4 and
# 128 x 8 8-32 B elsewhere).
_UNALIGNED_CONFIGS = {
    ("shrink", 2, 32): _depths(32, 4),
    ("shrink", 4, 32): _depths(16, 4, (2, 1)),
    ("shrink", 4, 64): _depths(16, 16, (2,)),
    ("expand", 2, 16): [_cfg(64, 8)],
    ("expand", 2, 64): [_cfg(64, 8)],
    ("expand", 2, 128): [_cfg(32, 8)],
    ("expand", 2, 256): [_cfg(64, 8), _cfg(32, 8)],
    ("expand", 4, 32): [_cfg(64, 8)],
}


def _all_configs(kernel_name: str) -> list:
    out = []
    for table in (_CONFIG_TABLE, _UNALIGNED_CONFIGS):
        out += [c for (k, _, _), cs in table.items() if k == kernel_name for c in cs if c not in out]
    return out


SHRINK_CONFIGS = _all_configs("shrink")
EXPAND_CONFIGS = _all_configs("expand")


def usable_configs(kernel_name: str, BM: int, R_PAD: int, elem: int, *, aligned: bool = True) -> list:
    """The autotune candidates for one launch shape, best-first (``aligned``: see
    :func:`rank_aligned`)."""
    for key, configs in _CONFIG_TABLE.items():
        k, e, r_max = key
        if k == kernel_name and e == elem and R_PAD <= r_max:
            return configs if aligned else _UNALIGNED_CONFIGS.get(key, configs)
    raise ValueError(f"no config for {kernel_name}, R_PAD={R_PAD}, element size {elem}")


def _pruner(kernel_name):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return usable_configs(kernel_name, args["BM"], args["R_PAD"], args["b_ptr"].element_size(),
                              aligned=bool(args["R_ALIGNED"]))
    return prune


# Keyed on size buckets (which also fix BM), the padded rank, whether the rank strides are
# 16-aligned (which picks the candidates) and the mode flags (so the forward and backward
# variants tune separately); triton adds the tensor dtypes.
_KEY = ["M_BUCKET", "N_BUCKET", "R_PAD", "R_ALIGNED"]
_AUTOTUNED = {}
if AUTOTUNE:
    _AUTOTUNED["shrink"] = triton.autotune(SHRINK_CONFIGS, key=_KEY + ["NEED_ACC", "COLSUM"],
                                           prune_configs_by={"early_config_prune": _pruner("shrink")})(_shrink_kernel)
    _AUTOTUNED["expand"] = triton.autotune(EXPAND_CONFIGS, key=_KEY + ["PROLOGUE_MIX", "DC", "COMPUTE_OUT", "HAS_BIAS"],
                                           prune_configs_by={"early_config_prune": _pruner("expand")})(_expand_kernel)


# Compile options every launch passes. FP fusion (FMA contraction) is on by default in
# Triton 3.6 to 3.9 and off from 3.10 (3.9 warns about it); passing it keeps one numerics
# and one register budget (what the AOT check measured) on every supported Triton.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


class Launch(NamedTuple):
    """One kernel launch as the host plans it: the bare kernel, its grid (a function of
    the config's meta-parameters), the arguments and host-chosen constexprs, and the
    candidate configs (best-first; one fixed config for kernels that are not autotuned)."""
    name: str
    fn: object
    grid: Callable[[dict], tuple]
    args: tuple
    kwargs: dict
    configs: list

    def config_kwargs(self, config) -> dict:
        """Every keyword a launch at ``config`` passes (what Triton specialises on)."""
        return {**self.kwargs, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
                **COMPILE_OPTIONS}


class NotWarmedUpError(RuntimeError):
    """A launch inside CUDA-graph capture would have to autotune or compile."""


_WARMUP_HINT = ("call salt_kernels.warmup(model, token_counts=[...], dtype=...) with every token count (and "
                "dtype) you will capture, before capturing: autotuning and compiling are not allowed while a "
                "CUDA graph is being captured")


def _capturing(device: torch.device) -> bool:
    """Is ``device``'s current stream capturing a CUDA graph? (Called under its guard.)"""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _autotune_key(tuner, args: tuple, kwargs: dict) -> tuple:
    """The key ``triton.runtime.Autotuner.run`` caches its choice under (the same in
    triton 3.6 to 3.9): the key arguments' values, then every tensor argument's dtype."""
    named = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def _check_tuned(launch: Launch) -> None:
    tuner = _AUTOTUNED.get(launch.name) if AUTOTUNE else None
    if tuner is None or len(tuner.configs) <= 1:
        return
    if _autotune_key(tuner, launch.args, launch.kwargs) not in tuner.cache:
        named = dict(zip(tuner.arg_names, launch.args))
        raise NotWarmedUpError(f"salt_kernels: the Triton {launch.name} kernel was never autotuned for this "
                               f"launch (M={named['M']}, dtype {launch.args[0].dtype}): {_WARMUP_HINT}")


def _refuse_compile(*args, **kwargs):
    """Triton's ``jit_cache_hook``: called just before a kernel compiles (cache miss)."""
    raise NotWarmedUpError(f"salt_kernels: Triton would compile {kwargs.get('repr', 'a kernel')} during "
                           f"CUDA-graph capture: {_WARMUP_HINT}")


@contextlib.contextmanager
def _no_compile():
    """While capturing: make any Triton compile raise instead of running."""
    knobs = triton.knobs.runtime
    old, knobs.jit_cache_hook = knobs.jit_cache_hook, _refuse_compile
    try:
        yield
    finally:
        knobs.jit_cache_hook = old


def _device_guard(device: torch.device):
    """Make ``device`` current, so Triton launches there, on its current stream."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _run(launches: list[Launch], device: torch.device) -> None:
    """Launch in order (called under ``_device_guard(device)``); autotune where enabled,
    else the first config. While capturing, refuse to autotune or compile."""
    capturing = _capturing(device)
    with _no_compile() if capturing else contextlib.nullcontext():
        for launch in launches:
            if capturing:
                _check_tuned(launch)
            tuner = _AUTOTUNED.get(launch.name) if AUTOTUNE else None
            if tuner is not None:
                tuner[launch.grid](*launch.args, **launch.kwargs, **COMPILE_OPTIONS)
            else:
                c = launch.configs[0]
                launch.fn[launch.grid(c.kwargs)](*launch.args, **launch.config_kwargs(c))


# ---------------------------------------------------------------------------------------
# Launch planning
# ---------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    """Power-of-two bucket for autotune keys (caps at 2^16 so large sizes share one tune)."""
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def rank_tiles(r: int) -> tuple[int, int]:
    """(R_PAD, BR): r padded to a power of two >= 16 (tl.dot's minimum), and the chunk of it
    processed at once in the mix and expand (64 keeps one R_PAD x BR core slice small)."""
    R_PAD = max(16, triton.next_power_of_2(r))
    return R_PAD, min(R_PAD, 64)


def block_m(M: int, R_PAD: int, elem: int) -> int:
    """Rows per program: the smallest tile covering small M (decode wastes less of the
    dot), else 64; 32 for R_PAD = 256 or fp32 inputs (tf32x3 keeps three copies of each
    operand), so the BM x R_PAD fp32 accumulator and operands stay in registers."""
    cap = 64 if R_PAD <= 128 and elem == 2 else 32
    return min(max(16, triton.next_power_of_2(max(M, 1))), cap)


def _plan(M: int, N: int, R_PAD: int, elem: int) -> tuple[int, int, int]:
    """(BM, split, n_per_split) for a shrink over N columns, from the sizes alone (run
    time only: never called while tracing). split > 1 only when the row blocks alone
    give fewer than _SPLIT_PROGRAMS programs."""
    BM = block_m(M, R_PAD, elem)
    m_blocks = triton.cdiv(M, BM)
    if FORCE_SPLIT is not None:
        split = FORCE_SPLIT
    else:
        split = 1 if m_blocks >= _SPLIT_PROGRAMS else min(triton.cdiv(_SPLIT_PROGRAMS, m_blocks),
                                                          triton.cdiv(N, _SPLIT_MIN_N))
    split = max(1, min(split, N))
    n_per_split = triton.cdiv(N, split)
    if split > 1 and FORCE_SPLIT is None:
        n_per_split = triton.cdiv(n_per_split, _SPLIT_ALIGN) * _SPLIT_ALIGN  # whole tiles per split
    split = triton.cdiv(N, n_per_split)
    return BM, split, n_per_split


def expand_block_m(BM: int, elem: int, prologue: bool, out_row_stride: int, aligned: bool = True) -> int:
    """The expand's rows per program: the shrink's BM, except 16 for fp32 inputs whose
    output rows are not 16-element aligned (D or K not a multiple of 16) or whose rank
    strides are not (``aligned`` False: :func:`rank_aligned`). Unaligned rows defeat the
    vectorised stores, and at 32 rows the tf32x3 tile then sat at 255 registers or
    spilled 8-28 B with every BN / warps / stages tried (aot.py --full); unaligned rank
    strides (scalar U/V loads) spilled 12-24 B at 32 rows with the r <= 32 config.
    Only without the prologue mix (always so for fp32) can the expand pick its own BM: it
    then reads the mix kernel's (M, r) output, not the shrink's BM-sized partials."""
    if elem == 4 and not prologue and (out_row_stride % 16 or not aligned):
        return min(BM, 16)
    return BM


def rank_aligned(r: int, *bases: torch.Tensor) -> bool:
    """Are the rank strides multiples of 16: r (the rows of Z, the core and the partials)
    and the row strides of the bases (U, V)? Then they carry Triton's divisibility-16
    hint; other ranks compile other specialisations, which take their own configs
    (``_UNALIGNED_CONFIGS``, :func:`expand_block_m`, :func:`mix_tiles`)."""
    return r % 16 == 0 and all(B.stride(0) % 16 == 0 for B in bases)


def _mix_in_prologue(R_PAD: int, BR: int, elem: int) -> bool:
    """Mix in the expand prologue for r <= 64 with fp16/bf16 inputs. With fp32 inputs the
    prologue's tf32x3 mix (three copies of each fp32 operand) spilled at every tile we
    tried (aot.py), so fp32 always takes the mix kernel."""
    return R_PAD == BR and elem == 2


def basis_for_kernels(B: torch.Tensor) -> torch.Tensor:
    """U or V as the kernels read it: rank axis at unit stride. Any other layout (e.g.
    ``V = Vh.t()`` straight from torch.linalg.svd) is copied: it is small (D x r or
    K x r), and the unit-stride specialisation is the one checked to compile without
    spills (transposed bases spilled 8-36 B in some configs, ``aot.py --full``). It also
    keeps the rank-axis offsets, int32 inside the kernels to save registers, in range.
    x and G are never copied."""
    if B.stride(1) == 1:
        return B
    return torch.empty(B.shape, dtype=B.dtype, device=B.device).copy_(B)


def _uses_kernels(t: torch.Tensor) -> bool:
    """CUDA tensors launch the kernels, CPU tensors only under the interpreter. fp64
    (gradcheck) always takes the torch path: tl.dot has no fp64 tensor cores."""
    if t.dtype == torch.float64:
        return False
    return t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu")


def _upcast_dot(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    return FP32_PRECISION if not INTERPRET else "ieee"


def _mix_precision(dtype: torch.dtype) -> str:
    """The r x r mix and dC run on fp32 operands: tf32x3 for fp32 inputs (fp32 accuracy);
    one TF32 pass for fp16/bf16 (~5e-4 relative, far inside their tolerances, and a
    third of tf32x3's operand registers). ("ieee" lowers to FMA code that ptxas spilled
    heavily, measured with aot.py.)"""
    return "ieee" if INTERPRET else FP32_PRECISION if dtype == torch.float32 else "tf32"


# The mix kernel is not autotuned: its work is tiny. Its dot operands are BM x BR fp32
# slices, three copies of each under tf32x3, hence 16 rows for fp32 inputs (32 rows
# spilled on sm_90 at R_PAD >= 32, and 16 rows at R_PAD = 16 on sm_80, with triton 3.9).
# With fp32 inputs and a rank that is not a multiple of 16 (rank_aligned), the backward's
# mix (dC and dZ) spilled 32 B on sm_90 at 4 warps and 16 rows (triton 3.8), at any depth:
# 8 warps there (at 32 rows, R_PAD = 16, 8 warps spilled 28 B on sm_80 instead). Warps
# change neither the tiles nor the dot's reduction order: same results.


def mix_tiles(R_PAD: int, elem: int, aligned: bool = True) -> tuple[int, int, int]:
    """(BM, BR, warps) of the mix kernel (measured spill-free with aot.py)."""
    BM = 16 if elem == 4 and R_PAD > 16 else 32
    return BM, min(32, R_PAD), 8 if elem == 4 and R_PAD > 16 and not aligned else 4


# Columns per program of the fixed-order partial sums (one fp32 element per thread at 4 warps x 4).
SUM_BLOCK = 512


def _fixed(warps: int, stages: int = 3) -> list:
    return [triton.Config({}, num_warps=warps, num_stages=stages)]


def _mix_launch(parts, split, M, r, Cm, Z, dc_part, mixed, *, store_z, dc, store_mix, R_PAD, elem,
                precision, aligned) -> Launch:
    """_mix_kernel: mixed = (sum of split partials) @ Cm, plus Z and the dC partials
    (dc_part has cdiv(M, BM) row blocks, BM from mix_tiles)."""
    BM, BR, warps = mix_tiles(R_PAD, elem, aligned)
    grid = (triton.cdiv(M, BM), R_PAD // BR)
    return Launch("mix", _mix_kernel, lambda meta: grid,
                  (parts, M * r, split, Cm, Cm.stride(0), Cm.stride(1), Z, Z.stride(0), Z.stride(1),
                   dc_part, mixed, M, r),
                  dict(BM=BM, R_PAD=R_PAD, BR=BR, STORE_Z=store_z, DC=dc, STORE_MIX=store_mix,
                       PRECISION=precision), _fixed(warps))


def _sum_launch(parts: torch.Tensor, out: torch.Tensor) -> Launch:
    """out (flattened) = parts.sum(0) in row order (parts fp32 (P, ...) contiguous)."""
    P, L = parts.shape[0], out.numel()
    return Launch("sum", _sum_partials_kernel, lambda meta: (triton.cdiv(L, SUM_BLOCK),),
                  (parts, P, L, out), dict(BLOCK=SUM_BLOCK), _fixed(4))


def forward_launches(x, U, V, C, bias) -> tuple[torch.Tensor, torch.Tensor, list[Launch]]:
    """Allocate y (M, D) and Z (M, r) and plan the forward's launches, for M, K, D >= 1
    (the launcher's and aot.py's one source of launch arguments)."""
    M, K = x.shape
    D, r = U.shape
    dev = x.device
    y = torch.empty((M, D), dtype=x.dtype, device=dev)
    Z = torch.empty((M, r), dtype=C.dtype, device=dev)
    elem = x.element_size()
    R_PAD, BR = rank_tiles(r)
    aligned = rank_aligned(r, U, V)
    BM, split, n_per_split = _plan(M, K, R_PAD, elem)
    m_blocks = triton.cdiv(M, BM)
    precision, upcast, mix_precision = _precision(x.dtype), _upcast_dot(x.dtype), _mix_precision(x.dtype)
    Cm = C.t()  # T = Z @ C^T
    # Unsplit, the shrink writes Z itself; split, its partials are summed (fixed order) later.
    parts = Z if split == 1 else torch.empty((split, M, r), dtype=torch.float32, device=dev)
    launches = [Launch("shrink", _shrink_kernel, lambda meta: (m_blocks, split),
                       (x, x.stride(0), x.stride(1), V, V.stride(0), V.stride(1), parts, parts,
                        M, K, r, n_per_split, _bucket(M), _bucket(K), int(aligned)),
                       dict(BM=BM, R_PAD=R_PAD, NEED_ACC=True, COLSUM=False, PRECISION=precision,
                            UPCAST_DOT=upcast), usable_configs("shrink", BM, R_PAD, elem, aligned=aligned))]
    prologue = _mix_in_prologue(R_PAD, BR, elem)
    if prologue:
        rows = parts
    else:
        rows = torch.empty((M, r), dtype=torch.float32, device=dev)
        launches.append(_mix_launch(parts, split, M, r, Cm, Z, rows, rows, store_z=split > 1, dc=False,
                                    store_mix=True, R_PAD=R_PAD, elem=elem, precision=mix_precision,
                                    aligned=aligned))
    eBM = expand_block_m(BM, elem, prologue, y.stride(0), aligned)
    e_blocks = triton.cdiv(M, eBM)
    launches.append(Launch(
        "expand", _expand_kernel, lambda meta: (e_blocks, triton.cdiv(D, meta["BN"])),
        (rows, M * r, split, Cm, Cm.stride(0), Cm.stride(1), Z, Z.stride(0), Z.stride(1), rows,
         U, U.stride(0), U.stride(1), y if bias is None else bias, 0 if bias is None else bias.stride(0),
         y, y.stride(0), y.stride(1), M, D, r, _bucket(M), _bucket(D), int(aligned)),
        dict(BM=eBM, R_PAD=R_PAD, BR=BR, PROLOGUE_MIX=prologue, STORE_Z=prologue and split > 1, DC=False,
             COMPUTE_OUT=True, HAS_BIAS=bias is not None, PRECISION=precision,
             MIX_PRECISION=mix_precision, UPCAST_DOT=upcast),
        usable_configs("expand", eBM, R_PAD, elem, aligned=aligned)))
    return y, Z, launches


def backward_launches(G, Z, U, V, C, need_dx, need_dC, need_db
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Launch]]:
    """Allocate dx, dC, db and plan the backward's launches, for M, K, D >= 1 and at least
    one gradient asked for (the launcher's and aot.py's one source of launch arguments)."""
    M, D = G.shape
    K, r = V.shape
    dev = G.device
    elem = G.element_size()
    f32 = dict(dtype=torch.float32, device=dev)
    dx = torch.empty((M, K), dtype=G.dtype, device=dev) if need_dx else G.new_empty(0)
    dC = torch.empty((r, r), dtype=C.dtype, device=dev) if need_dC else C.new_empty(0)
    db = torch.empty((D,), dtype=G.dtype, device=dev) if need_db else G.new_empty(0)
    need_dT = need_dx or need_dC
    R_PAD, BR = rank_tiles(r)
    aligned = rank_aligned(r, U, V)
    BM, split, n_per_split = _plan(M, D, R_PAD, elem)
    if not need_dT:  # db only: one pass over G, no U
        split, n_per_split = 1, D
    m_blocks = triton.cdiv(M, BM)
    precision, upcast, mix_precision = _precision(G.dtype), _upcast_dot(G.dtype), _mix_precision(G.dtype)
    prologue = _mix_in_prologue(R_PAD, BR, elem)
    db_part = torch.empty((m_blocks, D), **f32) if need_db else Z
    dc_part = torch.empty((m_blocks if prologue else triton.cdiv(M, mix_tiles(R_PAD, elem, aligned)[0]), r, r), **f32) if need_dC else Z
    parts = torch.empty((split, M, r), **f32) if need_dT else Z  # dT partials
    launches = [Launch("shrink", _shrink_kernel, lambda meta: (m_blocks, split),
                       (G, G.stride(0), G.stride(1), U, U.stride(0), U.stride(1), parts, db_part,
                        M, D, r, n_per_split, _bucket(M), _bucket(D), int(aligned)),
                       dict(BM=BM, R_PAD=R_PAD, NEED_ACC=need_dT, COLSUM=need_db, PRECISION=precision,
                            UPCAST_DOT=upcast), usable_configs("shrink", BM, R_PAD, elem, aligned=aligned))]
    if need_dT:
        rows = parts
        if not prologue:  # dZ = dT @ C: the core is applied on the right as is
            rows = torch.empty((M, r), **f32) if need_dx else parts
            launches.append(_mix_launch(parts, split, M, r, C, Z, dc_part, rows, store_z=False, dc=need_dC,
                                        store_mix=need_dx, R_PAD=R_PAD, elem=elem, precision=mix_precision,
                                        aligned=aligned))
        if need_dx or (prologue and need_dC):
            out = dx if need_dx else Z
            eBM = expand_block_m(BM, elem, prologue, dx.stride(0) if need_dx else 16, aligned)
            e_blocks = triton.cdiv(M, eBM)
            launches.append(Launch(
                "expand", _expand_kernel,
                (lambda meta: (e_blocks, triton.cdiv(K, meta["BN"]))) if need_dx else (lambda meta: (e_blocks, 1)),
                (rows, M * r, split, C, C.stride(0), C.stride(1), Z, Z.stride(0), Z.stride(1), dc_part,
                 V, V.stride(0), V.stride(1), Z, 0, out, out.stride(0) if need_dx else 0,
                 out.stride(1) if need_dx else 0, M, K, r, _bucket(M), _bucket(K), int(aligned)),
                dict(BM=eBM, R_PAD=R_PAD, BR=BR, PROLOGUE_MIX=prologue, STORE_Z=False, DC=prologue and need_dC,
                     COMPUTE_OUT=need_dx, HAS_BIAS=False, PRECISION=precision,
                     MIX_PRECISION=mix_precision, UPCAST_DOT=upcast),
                usable_configs("expand", eBM, R_PAD, elem, aligned=aligned)))
    if need_dC:
        launches.append(_sum_launch(dc_part, dC))
    if need_db:
        launches.append(_sum_launch(db_part, db))
    return dx, dC, db, launches


# ---------------------------------------------------------------------------------------
# Ops (contract: salt_kernels/backends/autograd.py)
# ---------------------------------------------------------------------------------------


def _forward_torch(x, U, V, C, bias):
    """fp64 inputs, CPU tensors outside the interpreter, and layers with K or D = 0."""
    acc = C.dtype
    Z = x.to(acc) @ V.to(acc)
    T = Z @ C.t()
    y = T @ U.to(acc).t() if bias is None else torch.addmm(bias.to(acc), T, U.to(acc).t())
    return y.to(x.dtype), Z


def _backward_torch(G, Z, U, V, C, need_dx, need_dC, need_db):
    acc = C.dtype
    dT = G.to(acc) @ U.to(acc)
    dx = ((dT @ C) @ V.to(acc).t()).to(G.dtype) if need_dx else G.new_empty(0)
    dC = dT.t() @ Z.to(acc) if need_dC else C.new_empty(0)
    db = G.to(acc).sum(0).to(G.dtype) if need_db else G.new_empty(0)
    return dx, dC, db


@torch.library.custom_op("salt_triton::forward", mutates_args=())
def salt_forward(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, C: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    D, r = U.shape
    if not _uses_kernels(x) or K == 0 or D == 0:  # (K or D = 0: nothing for a kernel to do)
        return _forward_torch(x, U, V, C, bias)
    if M == 0:
        return x.new_empty((0, D)), x.new_empty((0, r), dtype=C.dtype)
    with _device_guard(x.device):
        y, Z, launches = forward_launches(x, basis_for_kernels(U), basis_for_kernels(V), C, bias)
        _run(launches, x.device)
    return y, Z


@salt_forward.register_fake
def _(x, U, V, C, bias):
    # Shapes only, in terms of the (possibly symbolic) token count: no planning here.
    return x.new_empty((x.shape[0], U.shape[0])), x.new_empty((x.shape[0], U.shape[1]), dtype=C.dtype)


@torch.library.custom_op("salt_triton::backward", mutates_args=())
def salt_backward(G: torch.Tensor, Z: torch.Tensor, U: torch.Tensor, V: torch.Tensor, C: torch.Tensor,
                  need_dx: bool, need_dC: bool, need_db: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, D = G.shape
    K, r = V.shape
    if not _uses_kernels(G) or K == 0 or D == 0:
        return _backward_torch(G, Z, U, V, C, need_dx, need_dC, need_db)
    if M == 0 or not (need_dx or need_dC or need_db):
        dx = G.new_empty((M, K)) if need_dx else G.new_empty(0)
        dC = C.new_zeros((r, r)) if need_dC else C.new_empty(0)
        db = G.new_zeros((D,)) if need_db else G.new_empty(0)
        return dx, dC, db
    with _device_guard(G.device):
        dx, dC, db, launches = backward_launches(G, Z, basis_for_kernels(U), basis_for_kernels(V), C,
                                                 need_dx, need_dC, need_db)
        _run(launches, G.device)
    return dx, dC, db


@salt_backward.register_fake
def _(G, Z, U, V, C, need_dx, need_dC, need_db):
    M, K, D, r = G.shape[0], V.shape[0], G.shape[1], V.shape[1]
    return (G.new_empty((M, K)) if need_dx else G.new_empty(0),
            C.new_empty((r, r)) if need_dC else C.new_empty(0),
            G.new_empty((D,)) if need_db else G.new_empty(0))


register_salt_autograd(salt_forward, salt_backward)


def salt_linear_2d(x, U, V, sigma, X, Y, bias, scaling: float):
    return run_salt_op(salt_forward, x, U, V, sigma, X, Y, bias, scaling)
