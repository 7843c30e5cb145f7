// The one place where the devices differ. The algorithm (salt_linear.cpp) is written
// once, as a template over one of these two structs; everything else is shared.
//
//                     CpuDevice (cpu/salt_cpu.cpp)          CudaDevice (cuda/salt_cuda.cu)
//  gemm_dtype         fp32; bf16 on CPUs with bf16 dot      fp16/bf16 as given (tensor cores,
//                     instructions (oneDNN)                 fp32 accumulation); fp32; fp64
//  mm_widening_out    half GEMM, then copy into the fp32    aten::mm.dtype_out (fp32 result
//                     output (CPU has no mm.dtype)          straight from the fp32 accumulator)
//  empty_output       transparent huge pages from 32 MiB    the caching allocator
//  copy_block_elems   1 Mi elements (4 MiB: stays in cache) 32 Mi elements (few launches)
//  add_column_sums    fixed row blocks, one thread each     fixed row chunks, one CUDA thread
//                     (OpenMP), partials in block order     per column, partials in chunk order
//  for_each_slice     parallel over threads, BLAS serial    in order on the current stream
//                     inside (SerialBlasGuard)              (cuBLAS parallelises each call)
//  bmm_out            for_each_slice over the batch         one batched cuBLAS GEMM
//  sum_slices         partials added in slice order         one kernel, slices in order
//  mix_rows           parallel over row blocks, mix_row     a warp per row, columns across
//                     of mix_rows.h per row                 its lanes (coalesced), the r-long
//                                                           dots summed by a fixed shuffle tree
//
// Every reduction over M sums in an order that depends on the shapes only, never on the
// thread count or the GPU model.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace salt_kernels {

#define SALT_KERNELS_DEVICE_OPS                                                                           \
  /* The dtype the large GEMMs run in for inputs of `input` (acc: fp32, or fp64). */                    \
  static at::ScalarType gemm_dtype(at::ScalarType input, at::ScalarType acc);                         \
  /* out (acc dtype) = a @ b, with a and b in a narrower GEMM dtype. */                                 \
  static void mm_widening_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);              \
  /* A large output tensor (y, dx). */                                                                  \
  static at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);            \
  /* col_sums (D,) in fp32/fp64 += sum over the rows of G (any dtype, any strides). */                  \
  static void add_column_sums(const at::Tensor& G, at::Tensor& col_sums);                              \
  /* body(s) for s in [0, n); each body writes only its own slice. */                                   \
  static void for_each_slice(int64_t n, const std::function<void(int64_t)>& body);                     \
  /* out[b] = a[b] @ b[b] for each b of the batch (out preallocated, contiguous): each product */     \
  /* summed over its own rows only, in an order that does not depend on the thread count. */           \
  static void bmm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);                       \
  /* out = parts[0] + parts[1] + ..., in that order (parts: (n, ...), n >= 2). */                      \
  static void sum_slices(const at::Tensor& parts, at::Tensor& out);                                   \
  /* Mixed adapters: out[m] = mix_row(Z[m]) with adapter index[m] (-1: base_sigma only), see */        \
  /* mix_rows.h. Z, out (M, r); sigma (A, r); P, Q (A, r', r); base_sigma (r,) or undefined; all */    \
  /* contiguous and in one dtype; index int64 (M,), already checked to lie in [-1, A). */              \
  static void mix_rows(const at::Tensor& Z, const at::Tensor& index, const at::Tensor& sigma,          \
                       const at::Tensor& P, const at::Tensor& Q, const at::Tensor& base_sigma,          \
                       double scaling, at::Tensor& out);

struct CpuDevice {
  // Elements per row block where an input must be copied (converted or made BLAS-readable).
  static constexpr int64_t copy_block_elems = int64_t{1} << 20;
  SALT_KERNELS_DEVICE_OPS
};

struct CudaDevice {
  static constexpr int64_t copy_block_elems = int64_t{1} << 25;
  SALT_KERNELS_DEVICE_OPS
};

#undef SALT_KERNELS_DEVICE_OPS

}  // namespace salt_kernels
