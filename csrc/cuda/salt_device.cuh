// CUDA device code of the salt_kernels ops, free of torch headers so that plain nvcc
// compiles it (tests/test_extension.py checks registers, spills and local memory for
// sm_80 and sm_90). The host side is salt_cuda.cu.
//
// Every product of the chain runs on cuBLAS through ATen (../salt_linear.cpp). What is
// left here is what ATen cannot do: reductions over the M rows whose summation order is
// a function of M alone -- one fp32 partial per fixed row chunk, the partials summed in
// chunk order, no atomics. (at::sum picks its split from the launch configuration and
// the SM count, so its order, and its rounding, can change with the GPU model.) Their
// CPU twins are in ../cpu/salt_cpu.cpp. All offsets are int64.
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

// One thread per column, 256 threads per block (kThreads).
constexpr int kThreads = 256;

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

// out[m] = the core of adapter index[m] applied to Z[m]: the formula of mix_rows.h
// (out = z * sig + s * sum_j (P[j] . z) Q[j]), a warp per row, rows per block. The lanes
// run across the row's r columns, so every read and write of Z, out and the factors is
// coalesced (one thread per row read r strided values and wrote r, each in its own
// cache line); each dot product P[j] . z is summed by lane, then by a fixed butterfly of
// warp shuffles: deterministic, and equal to the CPU's mix_row up to rounding.
constexpr int kWarp = 32;
constexpr int kMixRowsPerBlock = kThreads / kWarp;

template <typename T>
__global__ void __launch_bounds__(kThreads)
mix_rows_kernel(const T* __restrict__ Z, const int64_t* __restrict__ index, const T* __restrict__ sigma,
                const T* __restrict__ P, const T* __restrict__ Q, const T* __restrict__ base, int64_t M, int64_t r,
                int64_t rl, T s, T* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kMixRowsPerBlock + threadIdx.x / kWarp;
  if (m >= M) return;  // (the whole warp: one row per warp)
  const int64_t a = index[m];
  const T* __restrict__ z = Z + m * r;
  T* __restrict__ o = out + m * r;
  const T* __restrict__ sig = a < 0 ? base : sigma + a * r;
  for (int64_t i = lane; i < r; i += kWarp) o[i] = z[i] * sig[i];
  if (a < 0) return;  // a base row: no low-rank term
  const T* __restrict__ P_a = P + a * rl * r;
  const T* __restrict__ Q_a = Q + a * rl * r;
  for (int64_t j = 0; j < rl; ++j) {
    T acc = T(0);
    for (int64_t i = lane; i < r; i += kWarp) acc += P_a[j * r + i] * z[i];
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    const T w = s * acc;
    for (int64_t i = lane; i < r; i += kWarp) o[i] += w * Q_a[j * r + i];
  }
}

template <typename T>
cudaError_t launch_mix_rows(const T* Z, const int64_t* index, const T* sigma, const T* P, const T* Q,
                            const T* base, int64_t M, int64_t r, int64_t rl, T s, T* out, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  mix_rows_kernel<T><<<static_cast<unsigned>(cdiv(M, kMixRowsPerBlock)), kThreads, 0, stream>>>(
      Z, index, sigma, P, Q, base, M, r, rl, s, out);
  return cudaGetLastError();
}

// Row chunks for the reductions over M: enough to fill the GPU, bounded so the partial
// buffers stay small; a function of M alone, so results do not depend on the device.
inline int64_t reduction_chunks(int64_t M) {
  const int64_t c = cdiv(M, 256);
  return c < 1 ? 1 : (c > 128 ? 128 : c);
}

}  // namespace salt_cuda
