// The CPU side of device.h: what the CPU does differently from CUDA under the shared
// algorithm of ../salt_linear.cpp.
//
// (BLAS is called from inside our own parallel region only single-threaded, through
// SerialBlasGuard: torch runs MKL with dynamic threading off, so nested threaded calls
// would oversubscribe. The extension is built with -fopenmp; without it at::parallel_for,
// a header template, silently runs on one thread.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/Utils.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdlib>

#include "../device.h"
#include "../host_output.h"  // empty_output: huge-page backed large outputs
#include "../mix_rows.h"

// MKL's C API (torch's BLAS on x86), weak so that builds against other BLAS still load.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace salt_kernels {
namespace {

using at::Tensor;

// Makes BLAS single-threaded on this thread for the guard's lifetime: a BLAS reduction
// split across threads would sum in a thread-count-dependent order.
class SerialBlasGuard {
 public:
  SerialBlasGuard() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlasGuard() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SerialBlasGuard(const SerialBlasGuard&) = delete;
  SerialBlasGuard& operator=(const SerialBlasGuard&) = delete;

 private:
  int previous_;
};

// The dtype the large GEMMs run in. fp32 (the accumulation dtype) except for bf16
// inputs on a CPU with bf16 dot-product instructions (AVX512-BF16 or AMX), where
// oneDNN's bf16 GEMM (fp32 accumulation, bf16 result) runs 2-4x faster than fp32;
// their bf16-rounded intermediates (Z, T = Z C^T, dT, dZ) are what a plain bf16 autograd
// chain rounds too. SALT_KERNELS_CPU_BF16_GEMM=0 forces fp32 (for bf16: no rounding
// of intermediates, slower); fp16 always computes in fp32 (no fast fp16 GEMM on CPU).
bool fast_bf16_gemm() {
  static const bool fast = [] {
    const char* v = std::getenv("SALT_KERNELS_CPU_BF16_GEMM");
    if (v != nullptr && v[0] == '0') return false;
    if (!at::globalContext().userEnabledMkldnn()) return false;
    const auto caps = at::cpu::get_cpu_capabilities();
    auto has = [&](const char* name) {
      const auto it = caps.find(name);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    return has("avx512_bf16") || has("amx_bf16");
  }();
  return fast;
}

}  // namespace

// Large outputs are backed by transparent huge pages (host_output.h, shared with the
// multi-adapter op).
Tensor CpuDevice::empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return ::salt_kernels::empty_output(sizes, options);
}

at::ScalarType CpuDevice::gemm_dtype(at::ScalarType input, at::ScalarType acc) {
  return input == at::kBFloat16 && acc == at::kFloat && fast_bf16_gemm() ? at::kBFloat16 : acc;
}

// col_sums[j] += sum_i G[i, j]: G in any floating dtype and any strides, summed in
// col_sums' dtype. Deterministic for any thread count: fixed row blocks (their size
// depends on the row count only), each summed in row order by one thread into its own
// partial row, the partials then added in block order. Whole rows per thread keep the
// reads streaming: G comes from DRAM here (it is the backward's input), and splitting
// columns instead cost 2x.
void CpuDevice::add_column_sums(const Tensor& G, Tensor& col_sums) {
  const int64_t rows = G.size(0), n = G.size(1), s0 = G.stride(0), s1 = G.stride(1);
  const int64_t block = std::max<int64_t>(256, (rows + 63) / 64);  // at most 64 partial rows
  const int64_t blocks = (rows + block - 1) / block;
  Tensor partials = at::zeros({blocks, n}, col_sums.options());
  TORCH_CHECK(col_sums.scalar_type() == (G.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "salt_kernels: column sums accumulate in float32 (float64 for float64 G)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "salt_column_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    acc_t* p = partials.mutable_data_ptr<acc_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* __restrict__ out = p + b * n;
        for (int64_t i = b * block; i < std::min(rows, (b + 1) * block); ++i) {
          const scalar_t* __restrict__ row = g + i * s0;
          if (s1 == 1) {
            for (int64_t j = 0; j < n; ++j) out[j] += static_cast<acc_t>(row[j]);
          } else {
            for (int64_t j = 0; j < n; ++j) out[j] += static_cast<acc_t>(row[j * s1]);
          }
        }
      }
    });
    acc_t* __restrict__ o = col_sums.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t j = 0; j < n; ++j) o[j] += p[b * n + j];
    }
  });
}

// The CPU has no aten::mm.dtype: the half-precision GEMM writes its own dtype, copied
// into the fp32 output (bf16 products of bf16 GEMM results, as a bf16 chain rounds them).
void CpuDevice::mm_widening_out(Tensor& out, const Tensor& a, const Tensor& b) { out.copy_(at::mm(a, b)); }

// Slices in parallel, each by single-threaded BLAS on whichever thread takes it.
void CpuDevice::for_each_slice(int64_t n, const std::function<void(int64_t)>& body) {
  // Worker threads start without the caller's dispatch state (autograd excluded, as it
  // is inside a kernel): carry it over, or ATen ops there would see autograd.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, n, 1, [&](int64_t s0, int64_t s1) {
    const at::ThreadLocalStateGuard caller_state_guard(caller_state);
    const SerialBlasGuard serial_blas;
    for (int64_t s = s0; s < s1; ++s) body(s);
  });
}

// The batch as slices on the threads, each GEMM on single-threaded BLAS: the same bits for
// any thread count (a threaded BLAS call would split each product's reduction by it).
void CpuDevice::bmm_out(Tensor& out, const Tensor& a, const Tensor& b) {
  for_each_slice(out.size(0), [&](int64_t i) {
    Tensor slice = out.select(0, i);
    at::mm_out(slice, a.select(0, i), b.select(0, i));
  });
}

void CpuDevice::sum_slices(const Tensor& parts, Tensor& out) {
  out.copy_(parts.select(0, 0));
  for (int64_t s = 1; s < parts.size(0); ++s) out.add_(parts.select(0, s));
}

// Rows are independent, so any split over threads gives the same bits; blocks of rows
// keep each thread streaming through Z and out.
void CpuDevice::mix_rows(const Tensor& Z, const Tensor& index, const Tensor& sigma, const Tensor& P,
                         const Tensor& Q, const Tensor& base_sigma, double scaling, Tensor& out) {
  const int64_t M = Z.size(0), r = Z.size(1), rl = P.size(1);
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "salt_mix_rows", [&] {
    const scalar_t* z = Z.const_data_ptr<scalar_t>();
    const int64_t* idx = index.const_data_ptr<int64_t>();
    const scalar_t* sig = sigma.const_data_ptr<scalar_t>();
    const scalar_t* p = P.const_data_ptr<scalar_t>();
    const scalar_t* q = Q.const_data_ptr<scalar_t>();
    const scalar_t* base = base_sigma.defined() ? base_sigma.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scaling);
    at::parallel_for(0, M, 256, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t a = idx[m];
        if (a < 0) {
          mix_row<scalar_t>(z + m * r, base, nullptr, nullptr, r, 0, s, o + m * r);
        } else {
          mix_row<scalar_t>(z + m * r, sig + a * r, p + a * rl * r, q + a * rl * r, r, rl, s, o + m * r);
        }
      }
    });
  });
}

}  // namespace salt_kernels
