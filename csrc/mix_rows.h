// The per-row core product of the mixed-adapter op, as the CPU runs it: the CPU loops over
// rows with it (cpu/salt_cpu.cpp); the CUDA kernel (cuda/salt_device.cuh) computes the
// same formula a warp per row, columns across the lanes. Torch-free.
//
// One row z (r values) of adapter a goes through its core C_a = diag(sigma_a) + s X_a Y_a
// by the factors, never an r x r matrix (2 r r' + r multiply-adds):
//
//   out = z * sig + s * sum_j (P[j] . z) Q[j]          P, Q: (r', r), rows contiguous
//
//   forward  T[m]  = C_a Z[m]      (P, Q) = (Y_a, X_a^T)
//   backward dZ[m] = C_a^T dT[m]   (P, Q) = (X_a^T, Y_a)
//
// Both passes read r-long contiguous rows only (the caller transposes X once per call),
// so the dot products and the axpys vectorise. The r' projections go through a buffer of
// kChunk values (registers on the GPU) so any r' works.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SALT_HOST_DEVICE __host__ __device__
#else
#define SALT_HOST_DEVICE
#endif

// A dot product's sum may be reassociated into vector lanes (GCC does not do it for
// floats by itself); the order is then fixed by the build, not by the data or threads.
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define SALT_SIMD_SUM_ACC _Pragma("omp simd reduction(+ : acc)")
#else
#define SALT_SIMD_SUM_ACC
#endif

#if defined(__CUDA_ARCH__)
#define SALT_UNROLL _Pragma("unroll")
#else
#define SALT_UNROLL
#endif

namespace salt_kernels {

constexpr int kMixChunk = 16;

// P, Q may be null when rl == 0 (a base row: out = z * sig).
template <typename T>
SALT_HOST_DEVICE inline void mix_row(const T* __restrict__ z, const T* __restrict__ sig, const T* __restrict__ P,
                                     const T* __restrict__ Q, int64_t r, int64_t rl, T s, T* __restrict__ out) {
  for (int64_t i = 0; i < r; ++i) out[i] = z[i] * sig[i];
  for (int64_t j0 = 0; j0 < rl; j0 += kMixChunk) {
    T w[kMixChunk];
    SALT_UNROLL
    for (int j = 0; j < kMixChunk; ++j) {
      if (j0 + j < rl) {
        const T* __restrict__ p = P + (j0 + j) * r;
        T acc = T(0);
        SALT_SIMD_SUM_ACC
        for (int64_t k = 0; k < r; ++k) acc += p[k] * z[k];
        w[j] = s * acc;
      }
    }
    SALT_UNROLL
    for (int j = 0; j < kMixChunk; ++j) {
      if (j0 + j < rl) {
        const T* __restrict__ q = Q + (j0 + j) * r;
        const T wj = w[j];
        for (int64_t i = 0; i < r; ++i) out[i] += wj * q[i];
      }
    }
  }
}

}  // namespace salt_kernels
