// CPU kernels of salt_kernels::salt_forward / salt_backward (schemas in ../salt_ops.cpp).
//
//  * The r x r mix costs 2 r^2 per row applied to the M x r intermediate, or 2 r^2 per
//    row of the basis when folded into it once per call (y = Z (U C)^T + b,
//    dx = dT (V C^T)^T). We fold only when M exceeds the basis rows (D, resp. K):
//    at decode sizes folding would cost more than the whole layer.
//  * Bias is fused into the expand GEMM (addmm): y is written once.
//  * The GEMMs are BLAS calls on whole matrices (BLAS threads them), in fp32 -- or in
//    bf16 for bf16 inputs on CPUs with bf16 dot-product instructions (gemm_dtype). Only
//    where the input must be converted (fp16 -> fp32, or an x or G without a unit
//    stride, e.g. the stride-0 G of y.sum()) do we walk the rows in blocks, so the
//    copies stay block-sized: no M x K or M x D temporaries besides the outputs.
//  * Reductions over M are deterministic whatever the thread count: db and dC are summed
//    over fixed row blocks (sizes depend on the shapes only), one thread per block, the
//    block partials added in order.
//  * Outputs of 32 MiB and more are backed by transparent huge pages (see empty_output).
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
#include <torch/library.h>

#include "../host_output.h"  // empty_output: huge-page backed large outputs

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <tuple>

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

// Rows per block when converting: about 1 Mi elements of fp32 scratch (4 MiB).
int64_t block_rows(int64_t M, int64_t width) {
  return std::clamp<int64_t>((int64_t{1} << 20) / std::max<int64_t>(width, 1), 64, std::max<int64_t>(M, 1));
}

// A matrix BLAS can read in place (one unit stride); others are copied by ATen's mm.
bool blas_readable(const Tensor& t) {
  return (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(t.size(1), 1)) ||
         (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(t.size(0), 1));
}

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

at::ScalarType gemm_dtype(at::ScalarType input, at::ScalarType acc) {
  return input == at::kBFloat16 && acc == at::kFloat && fast_bf16_gemm() ? at::kBFloat16 : acc;
}

void check_common(const Tensor& U, const Tensor& V, const Tensor& C, int64_t K) {
  TORCH_CHECK(U.dim() == 2 && V.dim() == 2 && C.dim() == 2, "salt_kernels: U, V, C must be 2-D");
  const int64_t r = U.size(1);
  TORCH_CHECK(V.size(0) == K && V.size(1) == r, "salt_kernels: V must be (K, r)");
  TORCH_CHECK(C.size(0) == r && C.size(1) == r, "salt_kernels: C must be (r, r)");
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble,
              "salt_kernels: C must be float32 or float64 (the accumulation dtype)");
}

// col_sums[j] += sum_i G[i, j]: G in any floating dtype and any strides, summed in
// col_sums' dtype. Deterministic for any thread count: fixed row blocks (their size
// depends on the row count only), each summed in row order by one thread into its own
// partial row, the partials then added in block order. Whole rows per thread keep the
// reads streaming: G comes from DRAM here (it is the backward's input), and splitting
// columns instead cost 2x.
void add_column_sums(const Tensor& G, Tensor& col_sums) {
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

std::tuple<Tensor, Tensor> salt_forward_cpu(const Tensor& x, const Tensor& U, const Tensor& V,
                                            const Tensor& C, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "salt_kernels: x must be 2-D (M, K)");
  const int64_t M = x.size(0), K = x.size(1), D = U.size(0), r = U.size(1);
  check_common(U, V, C, K);
  const auto acc = C.scalar_type();
  const auto acc_opts = x.options().dtype(acc);
  const auto gemm_t = gemm_dtype(x.scalar_type(), acc);

  // Mix folded into the expand weights when M > D: y = Z C^T U^T + b = Z (U C)^T + b.
  // Otherwise T = Z C^T per block, then y = T U^T + b.
  const Tensor V_g = V.to(gemm_t);
  const bool fold_mix = M > D;
  const Tensor expand_t = (fold_mix ? at::mm(U.to(acc), C) : U).to(gemm_t).t();  // (r, D) view
  const Tensor C_t = C.t();
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor bias_g = has_bias ? bias->to(gemm_t) : Tensor();

  Tensor Z = at::empty({M, r}, acc_opts);
  Tensor y = empty_output({M, D}, x.options());
  if (M == 0) return {y, Z};

  // fp16 (and bf16 without bf16 hardware): compute in fp32, converting a block at a time.
  const bool widen = x.scalar_type() != gemm_t;
  // x without a unit stride would be copied whole by mm: copy it a block at a time instead.
  const bool copy_x = widen || !blas_readable(x);
  const int64_t bm = copy_x ? block_rows(M, std::max(K, D)) : M;
  Tensor y_acc_buf = widen ? at::empty({std::min(bm, M), D}, acc_opts) : Tensor();
  for (int64_t m0 = 0; m0 < M; m0 += bm) {
    const int64_t rows = std::min(bm, M - m0);
    Tensor x_blk = x.narrow(0, m0, rows);
    if (copy_x) x_blk = x_blk.to(gemm_t, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
    Tensor Z_blk = Z.narrow(0, m0, rows);
    Tensor Z_g;  // Z_blk in the GEMM dtype
    if (gemm_t == acc) {
      at::mm_out(Z_blk, x_blk, V_g);  // shrink
      Z_g = Z_blk;
    } else {
      Z_g = at::mm(x_blk, V_g);  // shrink, bf16 GEMM (fp32 accumulation, bf16 result)
      Z_blk.copy_(Z_g);
    }
    Tensor y_blk = y.narrow(0, m0, rows);
    Tensor out = widen ? y_acc_buf.narrow(0, 0, rows) : y_blk;
    const Tensor T_g = fold_mix ? Z_g : at::mm(Z_blk, C_t).to(gemm_t);  // mix (unless folded)
    if (has_bias) {
      at::addmm_out(out, bias_g, T_g, expand_t);  // expand + bias, one write of y
    } else {
      at::mm_out(out, T_g, expand_t);
    }
    if (widen) y_blk.copy_(out);
  }
  return {y, Z};
}

std::tuple<Tensor, Tensor, Tensor> salt_backward_cpu(const Tensor& G, const Tensor& Z, const Tensor& U,
                                                     const Tensor& V, const Tensor& C, bool need_dx,
                                                     bool need_dC, bool need_db) {
  TORCH_CHECK(G.dim() == 2 && Z.dim() == 2, "salt_kernels: G and Z must be 2-D");
  const int64_t M = G.size(0), D = G.size(1), K = V.size(0), r = U.size(1);
  check_common(U, V, C, K);
  TORCH_CHECK(U.size(0) == D && Z.size(0) == M && Z.size(1) == r, "salt_kernels: G (M, D), Z (M, r) expected");
  const auto acc = C.scalar_type();
  const auto acc_opts = G.options().dtype(acc);
  const auto gemm_t = gemm_dtype(G.scalar_type(), acc);

  Tensor dx = need_dx ? empty_output({M, K}, G.options()) : at::empty({0}, G.options());
  Tensor dC = need_dC ? at::zeros({r, r}, acc_opts) : at::empty({0}, acc_opts);
  Tensor db_acc = need_db ? at::zeros({D}, acc_opts) : Tensor();
  const bool need_dT = need_dx || need_dC;
  if (M > 0 && (need_dT || need_db)) {
    const Tensor U_g = U.to(gemm_t);
    // dx = dZ V^T = dT C V^T = dT (V C^T)^T: the mix folded into the (K, r) matrix when
    // M > K (see the header), else applied to each block: dZ = dT C.
    const bool fold_mix = M > K;
    const Tensor shrink_t = !need_dx ? Tensor() : (fold_mix ? at::mm(V.to(acc), C.t()) : V).to(gemm_t).t();
    const bool widen = G.scalar_type() != gemm_t;
    // Blocks only where G must be copied (conversion, or no unit stride); dC is summed
    // per block of at most 1024 rows either way, so its order depends on M alone.
    const bool copy_G = widen || !blas_readable(G);
    const int64_t bm = copy_G ? block_rows(M, std::max(K, D)) : M;
    const int64_t dC_rows = 1024;
    Tensor dT_full = need_dT ? at::empty({M, r}, acc_opts) : Tensor();
    Tensor dx_acc_buf = (need_dx && widen) ? at::empty({std::min(bm, M), K}, acc_opts) : Tensor();
    for (int64_t m0 = 0; m0 < M; m0 += bm) {
      const int64_t rows = std::min(bm, M - m0);
      Tensor G_blk = G.narrow(0, m0, rows);
      if (copy_G) G_blk = G_blk.to(gemm_t, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
      if (need_db) add_column_sums(G_blk, db_acc);
      if (!need_dT) continue;
      Tensor dT = dT_full.narrow(0, m0, rows);
      Tensor dT_g;  // dT in the GEMM dtype
      if (gemm_t == acc) {
        at::mm_out(dT, G_blk, U_g);  // dT = G U
        dT_g = dT;
      } else {
        dT_g = at::mm(G_blk, U_g);  // bf16 GEMM (fp32 accumulation, bf16 result)
        dT.copy_(dT_g);
      }
      if (need_dx) {
        Tensor dx_blk = dx.narrow(0, m0, rows);
        Tensor out = widen ? dx_acc_buf.narrow(0, 0, rows) : dx_blk;
        at::mm_out(out, fold_mix ? dT_g : at::mm(dT, C).to(gemm_t), shrink_t);  // dx = dZ V^T
        if (widen) dx_blk.copy_(out);
      }
    }
    if (need_dC) {
      // dC = dT^T Z over fixed row slices, each by single-threaded BLAS on whichever
      // thread takes it, the partials added in slice order: the same sum for any thread count.
      const int64_t slices = (M + dC_rows - 1) / dC_rows;
      Tensor parts = at::empty({slices, r, r}, acc_opts);
      // Worker threads start without the caller's dispatch state (autograd excluded, as
      // it is inside this kernel): carry it over, or ATen ops there would see autograd.
      const at::ThreadLocalState caller_state;
      at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
        const at::ThreadLocalStateGuard caller_state_guard(caller_state);
        const SerialBlasGuard serial_blas;
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t m0 = s * dC_rows, rows = std::min(dC_rows, M - m0);
          Tensor part = parts.select(0, s);
          at::mm_out(part, dT_full.narrow(0, m0, rows).t(), Z.narrow(0, m0, rows));
        }
      });
      for (int64_t s = 0; s < slices; ++s) dC.add_(parts.select(0, s));
    }
  }
  Tensor db = need_db ? db_acc.to(G.scalar_type()) : at::empty({0}, G.options());
  return {dx, dC, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(salt_kernels, CPU, m) {
  m.impl("salt_forward", &salt_forward_cpu);
  m.impl("salt_backward", &salt_backward_cpu);
}

// No tensor arguments, so no device to dispatch on: registered for every key.
TORCH_LIBRARY_IMPL(salt_kernels, CompositeImplicitAutograd, m) {
  m.impl("cpu_gemm_dtype", [](at::ScalarType dtype) {
    return gemm_dtype(dtype, dtype == at::kDouble ? at::kDouble : at::kFloat);
  });
}

}  // namespace salt_kernels
