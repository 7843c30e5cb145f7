// CUDA device code of the salt_kernels ops, free of torch headers so that plain nvcc
// compiles it (tests/test_extension.py checks registers, spills and local memory for
// sm_80 and sm_90). The torch binding is salt_cuda.cu.
//
// Every product of the chain (DESIGN.md sections 1-2) is one "NT" tile GEMM
//     out[m, n] = sum_k A[m, k] * B[n, k]  (+ bias[n])
// on arbitrarily strided A and B (transposes are just swapped strides), accumulated in
// fp32 (fp64 for fp64 inputs) and cast at the store. Reductions over the M rows (dC and
// db) write one partial per row chunk, summed afterwards in chunk order: deterministic,
// no atomics. All offsets are int64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace salt_cuda {

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__.
template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) { return static_cast<Acc>(v); }
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

// 64x64 output tile per block of 16x16 threads, 4x4 outputs per thread at a 16-element
// stride (conflict-free shared reads, coalesced stores along n), K in steps of 16.
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;

struct GemmNTArgs {
  int64_t M, N, K;
  int64_t a_sm, a_sk;   // A[m, k] = A + m * a_sm + k * a_sk
  int64_t b_sn, b_sk;   // B[n, k] = B + n * b_sn + k * b_sk
  int64_t out_ld;       // out[m, n] = out + m * out_ld + n
  int64_t k_chunk;      // blockIdx.z sums k in [z * k_chunk, (z + 1) * k_chunk) ...
  int64_t out_z_stride; // ... into out + z * out_z_stride (split-K partials)
};

template <typename TA, typename TB, typename TOut, typename Acc>
__global__ void __launch_bounds__(kThreads, 2)
gemm_nt_kernel(const TA* __restrict__ A, const TB* __restrict__ B, const TOut* __restrict__ bias,
               TOut* __restrict__ out, GemmNTArgs p) {
  __shared__ Acc a_tile[kTileK][kTileM + 1];
  __shared__ Acc b_tile[kTileK][kTileN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // M tiles on grid x (up to 2^31 - 1 blocks: M is the large, batch-sized dimension).
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * p.k_chunk;
  const int64_t k_end = k_begin + p.k_chunk < p.K ? k_begin + p.k_chunk : p.K;

  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    // Each thread stages 4 elements of each 64x16 tile; out-of-range ones are zero.
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int idx = threadIdx.x + e * kThreads;
      const int row = idx / kTileK, kk = idx % kTileK;
      const int64_t k = k0 + kk;
      const int64_t m = m0 + row, n = n0 + row;
      a_tile[kk][row] = (m < p.M && k < k_end) ? to_acc<Acc>(A[m * p.a_sm + k * p.a_sk]) : Acc(0);
      b_tile[kk][row] = (n < p.N && k < k_end) ? to_acc<Acc>(B[n * p.b_sn + k * p.b_sk]) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      Acc a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = a_tile[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = b_tile[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }

  TOut* out_z = out + static_cast<int64_t>(blockIdx.z) * p.out_z_stride;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= p.N) continue;
      Acc v = acc[i][j];
      if (bias != nullptr) v += to_acc<Acc>(bias[n]);
      out_z[m * p.out_ld + n] = from_acc<TOut>(v);
    }
  }
}

// partials[z, n] = sum over rows m of chunk z of G[m, n] (column sums for db).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
column_sum_partials_kernel(const T* __restrict__ G, int64_t M, int64_t N, int64_t g_sm, int64_t g_sn,
                           int64_t rows_per_chunk, Acc* __restrict__ partials) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= N) return;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t m_end = m_begin + rows_per_chunk < M ? m_begin + rows_per_chunk : M;
  Acc s = Acc(0);
  for (int64_t m = m_begin; m < m_end; ++m) s += to_acc<Acc>(G[m * g_sm + n * g_sn]);
  partials[static_cast<int64_t>(blockIdx.y) * N + n] = s;
}

// out[n] = sum_z partials[z, n], in z order (deterministic), cast to TOut.
template <typename Acc, typename TOut>
__global__ void __launch_bounds__(kThreads)
sum_partials_kernel(const Acc* __restrict__ partials, int64_t chunks, int64_t N, TOut* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= N) return;
  Acc s = Acc(0);
  for (int64_t z = 0; z < chunks; ++z) s += partials[z * N + n];
  out[n] = from_acc<TOut>(s);
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out (M x N, row stride out_ld) = A B^T (+ bias). With k_chunks > 1, out holds k_chunks
// partial products (stride out_z_stride) to be summed with launch_sum_partials.
template <typename TA, typename TB, typename TOut, typename Acc>
cudaError_t launch_gemm_nt(const TA* A, int64_t a_sm, int64_t a_sk, const TB* B, int64_t b_sn, int64_t b_sk,
                           const TOut* bias, TOut* out, int64_t out_ld, int64_t M, int64_t N, int64_t K,
                           int64_t k_chunks, int64_t out_z_stride, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (k_chunks < 1) k_chunks = 1;
  GemmNTArgs p{M, N, K, a_sm, a_sk, b_sn, b_sk, out_ld, cdiv(K > 0 ? K : 1, k_chunks), out_z_stride};
  dim3 grid(static_cast<unsigned>(cdiv(M, kTileM)), static_cast<unsigned>(cdiv(N, kTileN)),
            static_cast<unsigned>(k_chunks));
  gemm_nt_kernel<TA, TB, TOut, Acc><<<grid, kThreads, 0, stream>>>(A, B, bias, out, p);
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t launch_column_sum_partials(const T* G, int64_t M, int64_t N, int64_t g_sm, int64_t g_sn,
                                       int64_t chunks, Acc* partials, cudaStream_t stream) {
  if (N == 0 || chunks == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(cdiv(N, kThreads)), static_cast<unsigned>(chunks));
  column_sum_partials_kernel<T, Acc><<<grid, kThreads, 0, stream>>>(G, M, N, g_sm, g_sn, cdiv(M, chunks),
                                                                   partials);
  return cudaGetLastError();
}

template <typename Acc, typename TOut>
cudaError_t launch_sum_partials(const Acc* partials, int64_t chunks, int64_t N, TOut* out, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  sum_partials_kernel<Acc, TOut><<<static_cast<unsigned>(cdiv(N, kThreads)), kThreads, 0, stream>>>(
      partials, chunks, N, out);
  return cudaGetLastError();
}

// Row chunks for the reductions over M: enough to fill the GPU, bounded so the partial
// buffers stay small; a function of M alone, so results do not depend on the device.
inline int64_t reduction_chunks(int64_t M) {
  const int64_t c = cdiv(M, 256);
  return c < 1 ? 1 : (c > 128 ? 128 : c);
}

}  // namespace salt_cuda
