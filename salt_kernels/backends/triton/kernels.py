"""The ``triton`` backend: fused Triton kernels for the SALT forward and backward.

    forward   Z = x V (shrink)   T = Z C^T (mix)   y = T U^T + b (expand)
    backward  dT = G U (shrink)  dZ = dT C (mix)   dx = dZ V^T (expand)
              dC = dT^T Z (dc), db = sum_rows G (shrink column sums; fixed-order sums)

The same kernels serve both directions, because the backward is the forward's shape
with (x, V, C^T, U) replaced by (G, U, C, V):

* ``_shrink_kernel``: A (M x N) @ B (N x r), the r-wide accumulator in fp32 registers,
  written as Z / dT, or at small M as S fp32 partials of a split over N; in the
  backward also db's column sums per row block.
* ``_sum_partials_kernel``: a fixed-order sum of fp32 partials (split partials into Z /
  dT, row-block partials into db, row-group partials into dC), two levels or more over
  fixed chunks of 32 partials, with vectorised tile loads, so the grid fills the GPU
  (see :func:`sum_levels`).
* ``_mix_kernel`` (r > 64, and fp32 at any r): the r-wide rows times the r x r core.
* ``_expand_kernel``: (mixed r-wide rows) @ B^T (r x N), bias as epilogue; for r <= 64
  in fp16/bf16 the mix runs in its prologue instead of a separate kernel.
* ``_dc_kernel``: dC = dT^T Z, each program accumulating a tile over a fixed group of
  row blocks, so the workspace is bounded (see :func:`dc_groups`).

What is fused is chosen by problem size (see :func:`_plan` and :func:`forward_launches`):

* small M, e.g. decode M = 1..64: cdiv(M, BM) is 1..4 programs, far too few to stream
  V (K x r) at bandwidth, so the shrink is split over K into S deterministic fp32
  partials (parallelism S x cdiv(M, BM): 256 programs at K = 4096), summed once by
  ``_sum_partials_kernel`` (not by every column block of the expand); the expand has
  cdiv(M, BM) x cdiv(D, BN) programs. At large M, cdiv(M, BM) fills the GPU and S = 1
  (no partials).
* r <= 64: the mix costs BM x 64 x 64 per expand tile, small next to its BM x BN x 64
  expand, so it rides in the expand prologue (no mixed-rows round trip).
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
reduce; dC's row groups and tiles and every sum's levels, chunks and tiles are
functions of the sizes (not torch's sum, whose split depends on the device). So results
are bitwise identical run to run, process to process, whichever config the autotuner
picks, on any GPU of one architecture with one Triton version. Across architectures the
tensor-core instructions differ, so results agree to rounding only.
tests/test_triton_runtime.py checks the config- and SM-independence under the
interpreter.

Tracing and the eager path. The ops are ``torch.library.custom_op``s with fake kernels
and registered autograd, opaque to ``torch.compile``: the fake kernels give output
shapes in terms of the (possibly symbolic) token count M and never look at its value,
and the real body plans and launches at run time with concrete sizes. (A ``triton_op``
would have its body traced, so the launch planner's ``cdiv(M, BM)``, size buckets and
split choice would specialise the graph on M: one recompile per sequence length.) The
cost is that Inductor cannot fuse into the kernels, which it would not do with these
anyway. Eager calls skip the custom-op dispatch (tens of microseconds a call, most of a
decode step): :func:`salt_linear_2d` runs the same bodies (:func:`forward_impl`,
:func:`backward_impl`) through one autograd Function (backends/autograd.py), choosing by
``torch.compiler.is_compiling()``. What a call does (path, basis copy, launch plan) is
decided once per layout (sizes, strides, dtypes, device, needed gradients): a call
allocates its outputs and launches each kernel as the plan reaches it.

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
The launches a call makes can be listed as :class:`Launch` records (kernel, grid,
arguments, candidate configs) by :func:`forward_launches` / :func:`backward_launches`,
from the same plans the ops launch from; ``python -m salt_kernels.aot`` compiles exactly
their specialisations.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple
import os

import torch
import triton
import triton.language as tl

from ..autograd import eager_function, register_salt_autograd, run_salt_eager, run_salt_op

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
_SPLIT_MIN_N = 16
# Up to this many columns one program reads all of B (<= 32 KiB at r = 64 in bf16): a
# split would cost a launch (the sum of its partials) for little.
_SPLIT_FROM_N = 256
# Split ranges wider than half of this are whole multiples of it, so that the shrink's K
# tiles (BN <= 64, a divisor of it) line up with the split boundaries for every config;
# narrower ones (decode) are one partly filled K tile each.
_SPLIT_ALIGN = 64
# Tests set this to force the split / unsplit path on small shapes (None: by size).
FORCE_SPLIT: int | None = None
# Sizes and loop counts are not specialised (no ==1 / divisible-by-16 variants): they
# only bound loops and masks. Strides are: stride 1 and 16-divisible strides vectorise.
# (L, the sum kernel's row length, is specialised: its divisibility by 16 lets the loads
# along a partial's row vectorise.)
_SIZES = ["M", "N", "R", "n_per_split", "M_BUCKET", "N_BUCKET", "R_ALIGNED", "P", "rows_per_group",
          "rows_per_program"]


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
def _chunk(pid, per_program, total):
    """[start, end) of program ``pid``'s share of a range split into fixed chunks of
    ``per_program`` (the split columns, dC's row groups, a sum's partials): 64-bit."""
    start = pid.to(tl.int64) * per_program
    return start, tl.minimum(start + per_program, total)


@_jit
def _shrink_kernel(
    a_ptr, stride_am, stride_an,  # A (M, N): x (forward) or G (backward), any strides
    b_ptr, stride_bn, stride_br,  # B (N, R): V (forward) or U (backward)
    out_ptr,  # fp32 (SPLIT, M, R) contiguous: this split's partial of A @ B (SPLIT = 1: Z or dT itself)
    colsum_ptr,  # COLSUM: (cdiv(M, BM), N) column sums of A per row block (db; one block: db itself)
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
    n_start, n_end = _chunk(pid_s, n_per_split, N)

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
    rows_ptr,  # fp32 (M, R) contiguous: Z (forward) or dT (backward)
    cm_ptr, stride_ci, stride_cj,  # core as applied on the right: C^T (forward) or C (backward)
    out_ptr,  # fp32 (M, R) = rows @ Cm
    M, R,
    BM: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (m, j): BR columns j of the r-wide rows times the core, for r > 64 (and
    fp32 inputs at any r).

    A separate kernel because Triton cannot slice a register tile: fusing an r = 256 mix
    into the expand needs the whole BM x 256 fp32 tile as one dot operand, which spilled
    (measured with aot.py). Here each operand is a BM x BR slice.

    HBM traffic: read M*R*4 (times R_PAD/BR programs along j, L2 hits) + R*R*4, write M*R*4.
    """
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_j = pid_j * BR + tl.arange(0, BR)
    mask_j = offs_j < R
    mixed = tl.zeros((BM, BR), dtype=tl.float32)
    for i0 in range(0, R, BR):
        offs_i = i0 + tl.arange(0, BR)
        mask_i = offs_i < R
        rows_i = tl.load(rows_ptr + offs_m[:, None] * R + offs_i[None, :],
                         mask=mask_m[:, None] & mask_i[None, :], other=0.0)
        cm = tl.load(cm_ptr + offs_i[:, None] * stride_ci + offs_j[None, :] * stride_cj,
                     mask=mask_i[:, None] & mask_j[None, :], other=0.0)
        mixed = tl.dot(rows_i, cm, mixed, input_precision=PRECISION)
    tl.store(out_ptr + offs_m[:, None] * R + offs_j[None, :], mixed, mask=mask_m[:, None] & mask_j[None, :])


@_jit
def _expand_kernel(
    rows_ptr,  # fp32 (M, R) contiguous: Z / dT (PROLOGUE_MIX) or the mixed rows T / dZ
    cm_ptr, stride_ci, stride_cj,  # core as applied on the right (PROLOGUE_MIX only)
    b_ptr, stride_bn, stride_br,  # B (N, R): U (forward) or V (backward); out = mixed @ B^T
    bias_ptr, stride_bias,
    out_ptr, stride_om, stride_on,
    M, N, R,
    M_BUCKET, N_BUCKET, R_ALIGNED,  # autotune key only
    BM: tl.constexpr, BN: tl.constexpr, R_PAD: tl.constexpr, BR: tl.constexpr,
    PROLOGUE_MIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, MIX_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Program (m, n): out[m-block, n-block] = mixed @ B[n-block]^T (+ bias epilogue).

    PROLOGUE_MIX (r <= 64 and fp16/bf16, R_PAD == BR): the program applies the core to its
    rows itself (BM x 64 x 64, small next to its BM x BN x 64 expand), so no mix kernel
    and no mixed-rows round trip.

    HBM traffic (element size e, P = cdiv(M, BM), Q = cdiv(N, BN)):
      read  B: P*N*R*e (L2 absorbs repeats)   rows: Q*M*R*4 (L2 hits after the first)
      write out: M*N*e, exactly once (bias fused: y is never re-read)
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
        rows = tl.load(rows_ptr + offs_m[:, None] * R + offs_r[None, :],
                       mask=mask_m[:, None] & mask_r[None, :], other=0.0)
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
            mixed = tl.load(rows_ptr + offs_m[:, None] * R + offs_j[None, :],
                            mask=mask_m[:, None] & mask_j[None, :], other=0.0)
            bt = tl.load(b_ptr + offs_j[:, None] * stride_br + offs_n[None, :] * stride_bn,
                         mask=mask_j[:, None] & mask_n[None, :], other=0.0)
            # rounded to the input dtype for the tensor cores, as cuBLAS would for a bf16 T
            acc = _dot(mixed.to(bt.dtype), bt, acc, PRECISION, UPCAST_DOT)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@_jit
def _dc_kernel(
    dt_ptr,  # fp32 (M, R) contiguous: dT = G U
    z_ptr, stride_zm, stride_zr,  # Z (M, R) saved by the forward, any strides
    out_ptr,  # fp32 (groups, R, R): dC of each row group (one group: dC itself)
    M, R, rows_per_group,
    BM: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (g, i, j): the BR x BR tile (i, j) of dT[rows of g]^T Z[rows of g], rows of
    group g = [g*rows_per_group, (g+1)*rows_per_group), accumulated over the group's row
    blocks in row order before one store. Groups, not row blocks, set the workspace:
    groups*R*R*4 bytes, bounded by the host (see ``_dc_groups``).

    HBM traffic: read M*R*4 of dT and of Z (times R_PAD/BR programs along i or j, L2
    hits), write groups*R*R*4.
    """
    pid_g = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    offs_i = pid_i * BR + tl.arange(0, BR)
    offs_j = pid_j * BR + tl.arange(0, BR)
    mask_i = offs_i < R
    mask_j = offs_j < R
    m_start, m_end = _chunk(pid_g, rows_per_group, M)
    acc = tl.zeros((BR, BR), dtype=tl.float32)
    for m0 in range(m_start, m_end, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < m_end
        dt = tl.load(dt_ptr + offs_m[:, None] * R + offs_i[None, :], mask=mask_m[:, None] & mask_i[None, :], other=0.0)
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_j[None, :] * stride_zr,
                    mask=mask_m[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(dt), z, acc, input_precision=PRECISION)
    tl.store(out_ptr + pid_g.to(tl.int64) * R * R + offs_i[:, None] * R + offs_j[None, :], acc,
             mask=mask_i[:, None] & mask_j[None, :])


@_jit
def _sum_partials_kernel(p_ptr, P, L, rows_per_program, out_ptr, BP: tl.constexpr, BL: tl.constexpr):
    """Program (c, k): out[k, c-block] = sum of partials p in [k*rows_per_program,
    (k+1)*rows_per_program) of fp32 (P, L) contiguous partials, columns c-block (BL).
    Each BP x BL tile is loaded at once (independent, vectorised loads along L) and summed
    by a fixed tree (its shape and warps are constants); tiles are added in row order. So
    the order depends on P and L only: the same on every GPU and for every autotune
    outcome. One level of a two-level (or deeper) reduction: see ``_sum_levels``."""
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_l = pid_c.to(tl.int64) * BL + tl.arange(0, BL)
    mask_l = offs_l < L
    p_start, p_end = _chunk(pid_k, rows_per_program, P)
    total = tl.zeros((BL,), dtype=tl.float32)
    for p0 in range(p_start, p_end, BP):
        offs_p = p0 + tl.arange(0, BP)
        tile = tl.load(p_ptr + offs_p[:, None] * L + offs_l[None, :],
                       mask=(offs_p < p_end)[:, None] & mask_l[None, :], other=0.0)
        total += tl.sum(tile, axis=0)
    tl.store(out_ptr + pid_k.to(tl.int64) * L + offs_l, total.to(out_ptr.dtype.element_ty), mask=mask_l)


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
    ("expand", 2, 64): [_cfg(64, 8)],  # 128 x 8 spilled 24 B on sm_90 at 32 rows (triton 3.9)
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
    _AUTOTUNED["expand"] = triton.autotune(EXPAND_CONFIGS, key=_KEY + ["PROLOGUE_MIX", "HAS_BIAS"],
                                           prune_configs_by={"early_config_prune": _pruner("expand")})(_expand_kernel)


# Compile options every launch passes. FP fusion (FMA contraction) is on by default in
# Triton 3.6 to 3.9 and off from 3.10 (3.9 warns about it); passing it keeps one numerics
# and one register budget (what the AOT check measured) on every supported Triton.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


class Launch(NamedTuple):
    """One kernel launch as the host plans it: the bare kernel, its grid (a function of
    the config's meta-parameters), the arguments and host-chosen constexprs, and the
    candidate configs (best-first; one fixed config for kernels that are not autotuned).
    ``default``: the grid and keywords of a launch at the first config, and ``tuned``: the
    keywords an autotuned launch passes, both computed once per cached plan."""
    name: str
    fn: object
    grid: Callable[[dict], tuple]
    args: tuple
    kwargs: dict
    configs: list
    default: tuple
    tuned: dict

    def config_kwargs(self, config) -> dict:
        """Every keyword a launch at ``config`` passes (what Triton specialises on)."""
        return _config_kwargs(self.kwargs, config)


def _config_kwargs(kwargs: dict, config) -> dict:
    return {**kwargs, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
            **COMPILE_OPTIONS}


class _Spec(NamedTuple):
    """A launch without its arguments: what a cached plan holds (``bind`` adds them)."""
    name: str
    fn: object
    grid: Callable[[dict], tuple]
    kwargs: dict
    configs: list
    default: tuple
    tuned: dict

    def bind(self, args: tuple) -> Launch:
        # tuple.__new__ directly: the NamedTuple constructor's argument handling costs as
        # much again, on every launch of every call
        return _tuple_new(Launch, (self.name, self.fn, self.grid, args, self.kwargs, self.configs, self.default,
                                   self.tuned))


_tuple_new = tuple.__new__


def _spec(name: str, fn, grid, kwargs: dict, configs: list) -> _Spec:
    first = configs[0]
    return _Spec(name, fn, grid, kwargs, configs, (grid(first.kwargs), _config_kwargs(kwargs, first)),
                 {**kwargs, **COMPILE_OPTIONS})


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


_NO_GUARD = contextlib.nullcontext()  # (reusable: it holds no state)


def _device_guard(device: torch.device):
    """Make ``device`` current, so Triton launches there, on its current stream."""
    return torch.cuda.device(device) if device.type == "cuda" else _NO_GUARD


def _launch(kernel, grid, args: tuple, kwargs: dict) -> None:
    """The launch itself: ``kernel[grid](*args, **kwargs)`` (a kernel or its autotuner).
    benchmarks/bench_host_overhead.py replaces this by a no-op to time everything else."""
    kernel[grid](*args, **kwargs)


def _run(launches: list[Launch], device: torch.device) -> None:
    """Launch in order (called under ``_device_guard(device)``); autotune where enabled,
    else the first config. While capturing, refuse to autotune or compile."""
    if _capturing(device):
        with _no_compile():
            for launch in launches:
                _check_tuned(launch)
            _launch_all(launches)
    else:
        _launch_all(launches)


def _launch_all(launches: list[Launch]) -> None:
    for launch in launches:
        _launch_now(launch, launch.args)


def _launch_now(spec, args: tuple) -> None:
    """Launch ``spec`` (a plan's _Spec, or a Launch) on ``args``: through its autotuner
    where autotuning is on, else at its first config. (A plan's emitter on the direct
    path: see _forward_runner.)"""
    tuner = _AUTOTUNED.get(spec.name) if AUTOTUNE else None
    if tuner is not None:
        _launch(tuner, spec.grid, args, spec.tuned)
    else:
        grid, kwargs = spec.default
        _launch(spec.fn, grid, args, kwargs)


def _listing(launches: list):
    """A plan's emitter that binds each launch into ``launches`` instead of launching."""
    return lambda spec, args: launches.append(spec.bind(args))


# ---------------------------------------------------------------------------------------
# Launch planning
# ---------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python (``triton.cdiv`` is a JIT constexpr function:
    microseconds a call from Python)."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as ``triton.next_power_of_2``, in plain Python."""
    return 1 << (n - 1).bit_length()


def _bucket(n: int) -> int:
    """Power-of-two bucket for autotune keys (caps at 2^16 so large sizes share one tune)."""
    return min(_next_power_of_2(max(n, 1)), 1 << 16)


def rank_tiles(r: int) -> tuple[int, int]:
    """(R_PAD, BR): r padded to a power of two >= 16 (tl.dot's minimum), and the chunk of it
    processed at once in the mix and expand (64 keeps one R_PAD x BR core slice small)."""
    R_PAD = max(16, _next_power_of_2(r))
    return R_PAD, min(R_PAD, 64)


def block_m(M: int, R_PAD: int, elem: int) -> int:
    """Rows per program: the smallest tile covering small M (decode wastes less of the
    dot), else 64; 32 for R_PAD = 256 or fp32 inputs (tf32x3 keeps three copies of each
    operand), so the BM x R_PAD fp32 accumulator and operands stay in registers."""
    cap = 64 if R_PAD <= 128 and elem == 2 else 32
    return min(max(16, _next_power_of_2(max(M, 1))), cap)


def _plan(M: int, N: int, R_PAD: int, elem: int) -> tuple[int, int, int]:
    """(BM, split, n_per_split) for a shrink over N columns, from the sizes alone (run
    time only: never called while tracing). split > 1 only when the row blocks alone
    give fewer than _SPLIT_PROGRAMS programs and N > _SPLIT_FROM_N; then each split reads
    at least _SPLIT_MIN_N columns, so decode (one row block) at N = 4096 gets 256 programs,
    about two per SM. Split ranges are whole multiples of 16 columns, and of the K tile
    (_SPLIT_ALIGN, a multiple of every BN) once they are that wide."""
    BM = block_m(M, R_PAD, elem)
    m_blocks = _cdiv(M, BM)
    if FORCE_SPLIT is not None:
        split = FORCE_SPLIT
    else:
        split = 1 if m_blocks >= _SPLIT_PROGRAMS or N <= _SPLIT_FROM_N else min(_cdiv(_SPLIT_PROGRAMS, m_blocks),
                                                                                _cdiv(N, _SPLIT_MIN_N))
    split = max(1, min(split, N))
    n_per_split = _cdiv(N, split)
    if split > 1 and FORCE_SPLIT is None:
        align = _SPLIT_ALIGN if n_per_split > _SPLIT_ALIGN // 2 else _SPLIT_MIN_N
        n_per_split = _cdiv(n_per_split, align) * align
    split = _cdiv(N, n_per_split)
    return BM, split, n_per_split


def expand_block_m(BM: int, elem: int, prologue: bool, out_row_stride: int, aligned: bool = True) -> int:
    """The expand's rows per program: the shrink's BM, except 16 for fp32 inputs whose
    output rows are not 16-element aligned (D or K not a multiple of 16) or whose rank
    strides are not (``aligned`` False: :func:`rank_aligned`). Unaligned rows defeat the
    vectorised stores, and at 32 rows the tf32x3 tile then sat at 255 registers or
    spilled 8-28 B with every BN / warps / stages tried (aot.py --full); unaligned rank
    strides (scalar U/V loads) spilled 12-24 B at 32 rows with the r <= 32 config.
    (The expand reads whole (M, r) rows, Z / dT or the mix kernel's output, so its row
    tile need not match the shrink's; ``prologue`` only says which configs were checked.)"""
    if elem == 4 and not prologue and (out_row_stride % 16 or not aligned):
        return min(BM, 16)
    return BM


def rank_aligned(r: int, *bases: torch.Tensor) -> bool:
    """Are the rank strides multiples of 16: r (the rows of Z, the core and the partials)
    and the row strides of the bases (U, V)? Then they carry Triton's divisibility-16
    hint; other ranks compile other specialisations, which take their own configs
    (``_UNALIGNED_CONFIGS``, :func:`expand_block_m`)."""
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
    return t.is_cuda or (INTERPRET and t.is_cpu)


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


def mix_tiles(R_PAD: int, elem: int) -> tuple[int, int, int]:
    """(BM, BR, warps) of the mix kernel (measured spill-free with aot.py, one stage)."""
    BM = 16 if elem == 4 and R_PAD > 16 else 32
    return BM, min(32, R_PAD), 4


def _fixed(warps: int, stages: int = 3) -> list:
    return [triton.Config({}, num_warps=warps, num_stages=stages)]


# Reductions over M: the dC kernel's row groups and the partial sums aim for this many
# programs (2 per SM of a 132-SM H100). A constant, not the device's SM count: it sets the
# summation order, which must be the same on every GPU.
_REDUCE_PROGRAMS = 264
# Partials summed per program and level (one BP x BL tile load); more partials take
# another level over the per-program sums.
_SUM_ROWS = 32
# ... except in a sum too short for any level to fill the GPU (the split shrink's M x r
# partials at decode): up to this many partials then go in one level, each program adding
# its tiles in row order (8 at most), one launch and one buffer fewer per direction.
_ONE_LEVEL_MAX_ROWS = 256
# dC rows per step of a program's loop (tl.dot's minimum K), and the workspace bound: the
# per-group partials of dC stay within G's size / _DC_WORKSPACE_DIVISOR.
_DC_BM = 16
_DC_WORKSPACE_DIVISOR = 8


def sum_levels(P: int, L: int) -> list[tuple[int, int, int, int]]:
    """The levels of the fixed-order sum of P fp32 partials of length L (P >= 2):
    ``[(rows_per_program, BL, programs along P, warps), ...]``, the first level over
    the P partials, each next one over the previous level's per-program sums. BL (columns
    per program) is the widest power of two from 4 to 128 that still gives
    ``_REDUCE_PROGRAMS`` column blocks, so every level fills the GPU wherever
    L >= 4 * _REDUCE_PROGRAMS; ``_SUM_ROWS`` partials per program keep each program to one
    tile load. Below that length no level can fill the GPU, so up to
    ``_ONE_LEVEL_MAX_ROWS`` partials are summed in one level (a program loops over its
    tiles). A function of (P, L) only, so the order is the same everywhere."""
    BL = 128
    while BL > 4 and _cdiv(L, BL) < _REDUCE_PROGRAMS:
        BL //= 2
    warps = max(1, min(4, _SUM_ROWS * BL // 128))  # 4 fp32 (one 16-byte load) per thread and row
    if _cdiv(L, BL) < _REDUCE_PROGRAMS and P <= _ONE_LEVEL_MAX_ROWS:
        return [(P, BL, 1, warps)]
    levels = []
    while P > _SUM_ROWS:
        groups = _cdiv(P, _SUM_ROWS)
        levels.append((_SUM_ROWS, BL, groups, warps))
        P = groups
    levels.append((P, BL, 1, warps))
    return levels


def _sum_specs(P: int, L: int) -> list[tuple]:
    """The launches of :func:`sum_levels` without arguments: (spec, partials it reads,
    their length, partials per program, shape of the fp32 buffer it writes or None for
    the last level, which writes the output)."""
    out = []
    for rows, BL, groups, warps in sum_levels(P, L):
        spec = _spec("sum", _sum_partials_kernel, (lambda meta, g=(_cdiv(L, BL), groups): g),
                     dict(BP=_SUM_ROWS, BL=BL), _fixed(warps))
        out.append((spec, P, L, rows, (groups, L) if groups > 1 else None))
        P = groups
    return out


def _emit_sums(emit, specs: list, parts: torch.Tensor, out: torch.Tensor) -> None:
    """Emit the sum launches of ``specs`` (from :func:`_sum_specs`): ``out`` (flattened) =
    the fixed-order sum of ``parts`` (P, ...) fp32 contiguous; fp32 buffers between levels."""
    for spec, P, L, rows, shape in specs:
        dst = out if shape is None else torch.empty(*shape, dtype=torch.float32, device=parts.device)
        emit(spec, (parts, P, L, rows, dst))
        parts = dst


def dc_groups(M: int, D: int, r: int, elem: int) -> tuple[int, int, int]:
    """(rows_per_group, groups, BR) of the dC kernel for G (M, D) of element size
    ``elem`` and rank r: row groups (multiples of _DC_BM rows) enough for
    _REDUCE_PROGRAMS programs, but few enough that the per-group fp32 partials
    (groups * r * r * 4 bytes, when there is more than one group) stay within G's size /
    _DC_WORKSPACE_DIVISOR (at r = 256 and D = 4096 in bf16, one partial per 32-row block
    would be as large as G); BR x BR output tiles, 16 of them from R_PAD = 64 up (each
    tile re-reads its rows of dT and Z from L2), more where the workspace bound leaves
    too few groups."""
    R_PAD = rank_tiles(r)[0]
    max_groups = max(1, (M * D * elem) // (_DC_WORKSPACE_DIVISOR * 4 * r * r))
    BR = R_PAD if R_PAD <= 16 else max(16, R_PAD // 4)
    while True:
        target = _cdiv(_REDUCE_PROGRAMS, (R_PAD // BR) ** 2)
        rows = _DC_BM * max(1, M // (_DC_BM * target))
        rows = max(rows, _DC_BM * _cdiv(_cdiv(M, max_groups), _DC_BM))
        groups = _cdiv(M, rows)
        if BR <= 16 or groups * (R_PAD // BR) ** 2 >= _REDUCE_PROGRAMS:
            return rows, groups, BR
        BR //= 2


def dc_workspace_bytes(M: int, D: int, r: int, elem: int) -> int:
    """Bytes of the dC kernel's partials (0 with one group: it writes dC itself)."""
    _, groups, _ = dc_groups(M, D, r, elem)
    return 0 if groups == 1 else groups * r * r * 4


def _mix_spec(M: int, r: int, R_PAD: int, elem: int, precision: str) -> _Spec:
    BM, BR, warps = mix_tiles(R_PAD, elem)
    grid = (_cdiv(M, BM), R_PAD // BR)
    # One stage: its loop has at most R_PAD / BR = 8 steps of small loads, and with
    # pipelining (2-3 stages) 16 B spilled on sm_80 (triton 3.6, bf16 inputs, forward) or
    # sm_90 (triton 3.9, fp32) at 4 and 8 warps (aot.py --full).
    return _spec("mix", _mix_kernel, lambda meta: grid, dict(BM=BM, BR=BR, PRECISION=precision),
                 _fixed(warps, stages=1))


# Launch plans, cached per layout: everything that depends only on the sizes, strides,
# dtypes and device (tiles, splits, configs, grids, constexprs) is computed once; a call
# then allocates its outputs and binds the arguments. A plan is one function
# ``build(*inputs, emit)`` that calls ``emit(spec, args)`` for each launch in order:
# _launch_now launches at once (the ops' direct path), _listing collects Launch records
# (forward_launches / backward_launches: aot.py, the GPU check, CUDA-graph capture).
# The ops' calls are cached per layout too, as runners (_forward_runner): which path,
# and the plan, decided once. Tests that change the planner's inputs (FORCE_SPLIT,
# usable_configs) call clear_plan_cache().
_PLANS: dict = {}
_MAX_PLANS = 4096  # a bound for runs that see ever new layouts (plans are rebuilt on demand)
# Set by tools that must see every launch the ops make as a list (the GPU check's
# recording, tests that spy on the planners): the ops then always take the listed path.
LIST_LAUNCHES = False


def clear_plan_cache() -> None:
    _PLANS.clear()


def _remember(key: tuple, value):
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = value
    return value


def _layout_key(kind: str, a: torch.Tensor, U: torch.Tensor, V: torch.Tensor, C: torch.Tensor, *rest) -> tuple:
    # V's shape carries K in the backward (G is (M, D)): without it two layers that differ
    # only in K would share a plan. INTERPRET picks the precision flags (the GPU check
    # records GPU plans in an interpreting process).
    return (kind, a.shape, a.stride(), a.dtype, a.device, U.shape, U.stride(), V.shape, V.stride(), C.dtype, C.stride(),
            FORCE_SPLIT, INTERPRET, *rest)


def forward_launches(x, U, V, C, bias) -> tuple[torch.Tensor, torch.Tensor, list[Launch]]:
    """Allocate y (M, D) and Z (M, r) and list the forward's launches, for M, K, D >= 1 and
    bases of unit rank stride: the plan the ops launch from (:func:`forward_impl`), as
    records (aot.py, the GPU check, CUDA-graph capture)."""
    key = _layout_key("fwd", x, U, V, C, None if bias is None else bias.stride(0))
    build = _PLANS.get(key) or _remember(key, _forward_plan(x, U, V, bias))
    launches = []
    y, Z = build(x, U, V, C, bias, _listing(launches))
    return y, Z, launches


def _forward_plan(x, U, V, bias):
    """The forward's plan for this layout: ``build(x, U, V, C, bias, emit)`` allocates y and
    Z, calls ``emit(spec, args)`` for each launch in stream order, and returns (y, Z)."""
    M, K = x.shape
    D, r = U.shape
    elem = x.element_size()
    R_PAD, BR = rank_tiles(r)
    aligned = rank_aligned(r, U, V)
    BM, split, n_per_split = _plan(M, K, R_PAD, elem)
    precision, upcast, mix_precision = _precision(x.dtype), _upcast_dot(x.dtype), _mix_precision(x.dtype)
    m_blocks = _cdiv(M, BM)
    prologue = _mix_in_prologue(R_PAD, BR, elem)
    keys = (_bucket(M), _bucket(K), _bucket(D), int(aligned))
    shrink = _spec("shrink", _shrink_kernel, lambda meta: (m_blocks, split),
                   dict(BM=BM, R_PAD=R_PAD, NEED_ACC=True, COLSUM=False, PRECISION=precision, UPCAST_DOT=upcast),
                   usable_configs("shrink", BM, R_PAD, elem, aligned=aligned))
    sums = _sum_specs(split, M * r) if split > 1 else []  # split partials summed once, into Z
    mix = None if prologue else _mix_spec(M, r, R_PAD, elem, mix_precision)
    eBM = expand_block_m(BM, elem, prologue, D, aligned)
    e_blocks = _cdiv(M, eBM)
    expand = _spec("expand", _expand_kernel, lambda meta: (e_blocks, _cdiv(D, meta["BN"])),
                   dict(BM=eBM, R_PAD=R_PAD, BR=BR, PROLOGUE_MIX=prologue, HAS_BIAS=bias is not None,
                        PRECISION=precision, MIX_PRECISION=mix_precision, UPCAST_DOT=upcast),
                   usable_configs("expand", eBM, R_PAD, elem, aligned=aligned))
    f32 = torch.float32
    # The strides are part of the plan's key: bound once here.
    xs, Us, Vs, ys = x.stride(), U.stride(), V.stride(), (D, 1)
    shrink_ints = (M, K, r, n_per_split, keys[0], keys[1], keys[3])
    expand_ints = (ys[0], ys[1], M, D, r, keys[0], keys[2], keys[3])
    bias_stride = 0 if bias is None else bias.stride(0)

    def build(x, U, V, C, bias, emit):
        # (sizes passed one by one: torch.empty parses them faster than a tuple, ~0.4 us a
        # buffer, and a decode step allocates eight per layer)
        dev = x.device
        cs = C.stride()
        y = torch.empty(M, D, dtype=x.dtype, device=dev)
        Z = torch.empty(M, r, dtype=C.dtype, device=dev)
        parts = Z if split == 1 else torch.empty(split, M, r, dtype=f32, device=dev)
        emit(shrink, (x, xs[0], xs[1], V, Vs[0], Vs[1], parts, parts) + shrink_ints)
        if sums:
            _emit_sums(emit, sums, parts, Z)
        rows = Z
        # T = Z @ C^T: C^T passed as C with its strides swapped
        if mix is not None:
            # into the split partials' buffer once they are summed (stream order), else a new one
            rows = parts if sums else torch.empty(M, r, dtype=f32, device=dev)
            emit(mix, (Z, C, cs[1], cs[0], rows, M, r))
        emit(expand, (rows, C, cs[1], cs[0], U, Us[0], Us[1], y if bias is None else bias, bias_stride, y) + expand_ints)
        return y, Z

    return build


def backward_launches(G, Z, U, V, C, need_dx, need_dC, need_db
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Launch]]:
    """Allocate dx, dC, db and list the backward's launches, for M, K, D >= 1, bases of
    unit rank stride and at least one gradient asked for (as :func:`forward_launches`)."""
    key = _layout_key("bwd", G, U, V, C, Z.stride(), need_dx, need_dC, need_db)
    build = _PLANS.get(key) or _remember(key, _backward_plan(G, Z.stride(), U, V, need_dx, need_dC, need_db))
    launches = []
    dx, dC, db = build(G, U, V, C, Z, _listing(launches))
    return dx, dC, db, launches


def _backward_plan(G, Z_strides, U, V, need_dx, need_dC, need_db):
    """The backward's plan (as :func:`_forward_plan`): ``build(G, U, V, C, Z, emit)`` (the
    forward's order, Z where the bias was: one runner serves both) returns (dx, dC, db)."""
    M, D = G.shape
    K, r = V.shape
    elem = G.element_size()
    need_dT = need_dx or need_dC
    R_PAD, BR = rank_tiles(r)
    aligned = rank_aligned(r, U, V)
    BM, split, n_per_split = _plan(M, D, R_PAD, elem)
    if not need_dT:  # db only: one pass over G, no U
        split, n_per_split = 1, D
    m_blocks = _cdiv(M, BM)
    precision, upcast, mix_precision = _precision(G.dtype), _upcast_dot(G.dtype), _mix_precision(G.dtype)
    prologue = _mix_in_prologue(R_PAD, BR, elem)
    keys = (_bucket(M), _bucket(K), _bucket(D), int(aligned))
    shrink = _spec("shrink", _shrink_kernel, lambda meta: (m_blocks, split),
                   dict(BM=BM, R_PAD=R_PAD, NEED_ACC=need_dT, COLSUM=need_db, PRECISION=precision,
                        UPCAST_DOT=upcast), usable_configs("shrink", BM, R_PAD, elem, aligned=aligned))
    dt_sums = _sum_specs(split, M * r) if need_dT and split > 1 else []  # split partials summed once, into dT
    dc = dc_sums = None
    rows_per_group = groups = 0
    if need_dC:
        rows_per_group, groups, dBR = dc_groups(M, D, r, elem)
        dc = _spec("dc", _dc_kernel, lambda meta: (groups, R_PAD // dBR, R_PAD // dBR),
                   dict(BM=_DC_BM, BR=dBR, PRECISION=mix_precision), _fixed(4))
        dc_sums = _sum_specs(groups, r * r) if groups > 1 else []
    mix = None if prologue or not need_dx else _mix_spec(M, r, R_PAD, elem, mix_precision)
    expand = None
    if need_dx:
        eBM = expand_block_m(BM, elem, prologue, K, aligned)
        e_blocks = _cdiv(M, eBM)
        expand = _spec("expand", _expand_kernel, lambda meta: (e_blocks, _cdiv(K, meta["BN"])),
                       dict(BM=eBM, R_PAD=R_PAD, BR=BR, PROLOGUE_MIX=prologue, HAS_BIAS=False, PRECISION=precision,
                            MIX_PRECISION=mix_precision, UPCAST_DOT=upcast),
                       usable_configs("expand", eBM, R_PAD, elem, aligned=aligned))
    db_sums = _sum_specs(m_blocks, D) if need_db and m_blocks > 1 else []
    f32 = torch.float32
    # The strides are part of the plan's key: bound once here.
    Gs, Us, Vs, Zs = G.stride(), U.stride(), V.stride(), Z_strides
    shrink_ints = (M, D, r, n_per_split, keys[0], keys[2], keys[3])
    expand_ints = (K, 1, M, K, r, keys[0], keys[1], keys[3])

    def build(G, U, V, C, Z, emit):
        dev = G.device
        dx = torch.empty(M, K, dtype=G.dtype, device=dev) if need_dx else G.new_empty(0)
        dC = torch.empty(r, r, dtype=C.dtype, device=dev) if need_dC else C.new_empty(0)
        db = torch.empty(D, dtype=G.dtype, device=dev) if need_db else G.new_empty(0)
        # one row block: the shrink writes db itself (cast at the store), else per-block partials
        db_part = (torch.empty(m_blocks, D, dtype=f32, device=dev) if db_sums else db) if need_db else Z
        dT = torch.empty(M, r, dtype=f32, device=dev) if need_dT else Z
        parts = torch.empty(split, M, r, dtype=f32, device=dev) if dt_sums else dT
        emit(shrink, (G, Gs[0], Gs[1], U, Us[0], Us[1], parts, db_part) + shrink_ints)
        if dt_sums:
            _emit_sums(emit, dt_sums, parts, dT)
        if dc is not None:
            dc_part = torch.empty(groups, r, r, dtype=f32, device=dev) if dc_sums else dC
            emit(dc, (dT, Z, Zs[0], Zs[1], dc_part, M, r, rows_per_group))
            if dc_sums:
                _emit_sums(emit, dc_sums, dc_part, dC)
        if expand is not None:  # dZ = dT @ C: the core is applied on the right as is
            cs = C.stride()
            rows = dT
            if mix is not None:  # (the split partials' buffer is free again, as in the forward)
                rows = parts if dt_sums else torch.empty(M, r, dtype=f32, device=dev)
                emit(mix, (dT, C, cs[0], cs[1], rows, M, r))
            emit(expand, (rows, C, cs[0], cs[1], V, Vs[0], Vs[1], Z, 0, dx) + expand_ints)
        if db_sums:
            _emit_sums(emit, db_sums, db_part, db)
        return dx, dC, db

    return build


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


def forward_impl(x, U, V, C, bias):
    """The forward of the contract (backends/autograd.py): the body of the ``salt_forward``
    op and of the eager path. What a call of this layout does is decided once
    (:func:`_forward_runner`)."""
    key = _layout_key("run-fwd", x, U, V, C, None if bias is None else bias.stride(0))
    run = _PLANS.get(key) or _remember(key, _forward_runner(x, U, V, bias))
    return run(x, U, V, C, bias)


def backward_impl(G, Z, U, V, C, need_dx, need_dC, need_db):
    """The backward of the contract: the body of the ``salt_backward`` op and of the eager
    path (decided once per layout, as the forward)."""
    key = _layout_key("run-bwd", G, U, V, C, Z.stride(), need_dx, need_dC, need_db)
    run = _PLANS.get(key) or _remember(key, _backward_runner(G, Z, U, V, need_dx, need_dC, need_db))
    return run(G, U, V, C, Z)


def _forward_runner(x, U, V, bias):
    """How the forward of this layout runs: the torch path (fp64, CPU tensors outside the
    interpreter, K or D = 0: nothing for a kernel to do), empty outputs (M = 0), or the
    kernels on the plan made here (:func:`_kernel_runner`)."""
    M, K = x.shape
    D, r = U.shape
    if not _uses_kernels(x) or K == 0 or D == 0:
        return _forward_torch
    if M == 0:
        return lambda x, U, V, C, bias: (x.new_empty((0, D)), x.new_empty((0, r), dtype=C.dtype))
    build = _forward_plan(x, basis_for_kernels(U), basis_for_kernels(V), bias)
    return _kernel_runner(build, lambda *args: forward_launches(*args), x.device, U, V)


def _backward_runner(G, Z, U, V, need_dx, need_dC, need_db):
    """How the backward of this layout runs (as :func:`_forward_runner`; no gradient asked
    for, or M = 0, gives empty or zero outputs)."""
    M, D = G.shape
    K, r = V.shape
    if not _uses_kernels(G) or K == 0 or D == 0:
        return lambda G, U, V, C, Z: _backward_torch(G, Z, U, V, C, need_dx, need_dC, need_db)
    if M == 0 or not (need_dx or need_dC or need_db):
        def empty(G, U, V, C, Z):
            dx = G.new_empty((M, K)) if need_dx else G.new_empty(0)
            dC = C.new_zeros((r, r)) if need_dC else C.new_empty(0)
            db = G.new_zeros((D,)) if need_db else G.new_empty(0)
            return dx, dC, db
        return empty
    build = _backward_plan(G, Z.stride(), basis_for_kernels(U), basis_for_kernels(V), need_dx, need_dC, need_db)
    return _kernel_runner(build, lambda G, U, V, C, Z: backward_launches(G, Z, U, V, C, need_dx, need_dC, need_db),
                          G.device, U, V)


def _kernel_runner(build, listed, device: torch.device, U: torch.Tensor, V: torch.Tensor):
    """A kernel call of one layout, ``run(a, U, V, C, e)`` (x and bias forward, G and Z
    backward): a basis whose rank axis is strided is copied first (basis_for_kernels), then
    ``build`` launches as it plans; CUDA calls go through :func:`_guarded_call`. (The
    planners are looked up at call time, where tools replace them.)"""
    copy_U, copy_V, guarded = U.stride(1) != 1, V.stride(1) != 1, _guarded(device)

    def run(a, U, V, C, e):
        if copy_U:
            U = basis_for_kernels(U)
        if copy_V:
            V = basis_for_kernels(V)
        if not guarded and not LIST_LAUNCHES:
            return build(a, U, V, C, e, _launch_now)
        return _guarded_call(build, listed, (a, U, V, C, e))

    return run


def _guarded(device: torch.device) -> bool:
    """Do calls on ``device`` need its device guard and the capture check? (CUDA: Triton
    launches on the current device's current stream, which may be capturing a graph.)"""
    return device.type == "cuda"


def _guarded_call(build, listed, args: tuple) -> tuple:
    """A call under the inputs' device guard: launched as planned (``build(*args,
    _launch_now)``), except while the stream captures a CUDA graph, or for tools that set
    LIST_LAUNCHES: then ``listed(*args)`` plans the whole call into a list first, which
    :func:`_run` checks (nothing may autotune or compile while capturing) and launches."""
    device = args[0].device
    with _device_guard(device):
        if LIST_LAUNCHES or _capturing(device):
            *outputs, launches = listed(*args)
            _run(launches, device)
            return tuple(outputs)
        return build(*args, _launch_now)


@torch.library.custom_op("salt_triton::forward", mutates_args=())
def salt_forward(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, C: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_impl(x, U, V, C, bias)


@salt_forward.register_fake
def _(x, U, V, C, bias):
    # Shapes only, in terms of the (possibly symbolic) token count: no planning here.
    return x.new_empty((x.shape[0], U.shape[0])), x.new_empty((x.shape[0], U.shape[1]), dtype=C.dtype)


@torch.library.custom_op("salt_triton::backward", mutates_args=())
def salt_backward(G: torch.Tensor, Z: torch.Tensor, U: torch.Tensor, V: torch.Tensor, C: torch.Tensor,
                  need_dx: bool, need_dC: bool, need_db: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_impl(G, Z, U, V, C, need_dx, need_dC, need_db)


@salt_backward.register_fake
def _(G, Z, U, V, C, need_dx, need_dC, need_db):
    M, K, D, r = G.shape[0], V.shape[0], G.shape[1], V.shape[1]
    return (G.new_empty((M, K)) if need_dx else G.new_empty(0),
            C.new_empty((r, r)) if need_dC else C.new_empty(0),
            G.new_empty((D,)) if need_db else G.new_empty(0))


register_salt_autograd(salt_forward, salt_backward)
_EAGER = eager_function(forward_impl, backward_impl)


def salt_linear_2d(x, U, V, sigma, X, Y, bias, scaling: float):
    """Traced (torch.compile, export) and under torch.func transforms: the custom ops
    above. Eager: the same bodies through one autograd Function, without the custom-op
    dispatch (tens of microseconds a call)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return run_salt_op(salt_forward, x, U, V, sigma, X, Y, bias, scaling)
    return run_salt_eager(_EAGER, forward_impl, x, U, V, sigma, X, Y, bias, scaling)
