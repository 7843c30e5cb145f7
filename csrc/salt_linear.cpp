// salt_kernels::salt_forward / salt_backward (schemas in salt_ops.cpp), written once for
// every device: the large products are ATen GEMMs into preallocated outputs (MKL/oneDNN
// on CPU, cuBLAS/cuBLASLt on CUDA); what differs between devices sits in device.h.
// The CPU build runs every line of this file, so the CPU tests cover the CUDA algorithm.
//
//  * Precision: the GEMMs run in Dev::gemm_dtype (on CUDA fp16/bf16 in the input dtype
//    on tensor cores, fp32 accumulation). The r-wide intermediates Z = x V and dT = G U
//    are written in the accumulation dtype (fp32; fp64 for fp64), the mix T = Z C^T and
//    dZ = dT C computed from them in it, and cast to the GEMM dtype as the expand's /
//    dx's operand (as the Triton kernels cast T before their expand dot).
//  * The r x r mix costs 2 r^2 per row applied to the M x r intermediate, or 2 r^2 per
//    row of the basis when folded into it once per call (y = Z (U C)^T + b,
//    dx = dT (V C^T)^T). We fold only when M exceeds the basis rows (D, resp. K): at
//    decode sizes folding would cost more than the whole layer.
//  * Bias is fused into the expand GEMM (addmm): y is written once.
//  * Inputs are read in place when the GEMM can (one unit stride, GEMM dtype). Otherwise
//    (fp16 on CPU, a stride-0 G from y.sum(), ...) rows are converted a block at a time,
//    so the copies stay block-sized: no M x K or M x D temporaries besides the outputs.
//  * Reductions over M are deterministic: db by Dev::add_column_sums, dC over fixed row
//    slices (sizes depend on M only; one batched GEMM) added in slice order.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

#include "device.h"
#include "op_checks.h"

namespace salt_kernels {
namespace {

using at::Tensor;

// Rows per block when an input is copied: copy_block_elems elements of the widest row.
int64_t block_rows(int64_t M, int64_t width, int64_t block_elems) {
  return std::clamp<int64_t>(block_elems / std::max<int64_t>(width, 1), 64, std::max<int64_t>(M, 1));
}

// A matrix a BLAS can read in place (one unit stride); others are copied block-wise.
bool blas_readable(const Tensor& t) {
  return (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(t.size(1), 1)) ||
         (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(t.size(0), 1));
}

void check_shapes(const char* op, const Tensor& U, const Tensor& V, const Tensor& C, int64_t K) {
  TORCH_CHECK(U.dim() == 2 && V.dim() == 2 && C.dim() == 2, "salt_kernels.", op, ": U, V, C must be 2-D");
  const int64_t r = U.size(1);
  TORCH_CHECK(V.size(0) == K && V.size(1) == r, "salt_kernels.", op, ": V must be (K, r) = (", K, ", ", r,
              "), got ", V.sizes());
  TORCH_CHECK(C.size(0) == r && C.size(1) == r, "salt_kernels.", op, ": C must be (r, r) = (", r, ", ", r,
              "), got ", C.sizes());
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble, "salt_kernels.", op,
              ": C must be float32 or float64 (the accumulation dtype), got ", C.scalar_type());
}

// out (acc dtype) = a @ b for a, b in the GEMM dtype.
template <class Dev>
void mm_into(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    Dev::mm_widening_out(out, a, b);
  }
}

template <class Dev>
std::tuple<Tensor, Tensor> salt_forward(const Tensor& x, const Tensor& U, const Tensor& V, const Tensor& C,
                                        const std::optional<Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  check_one_device("salt_forward", {{"x", &x}, {"U", &U}, {"V", &V}, {"C", &C}, {"bias", has_bias ? &*bias : nullptr}});
  TORCH_CHECK(x.dim() == 2, "salt_kernels.salt_forward: x must be 2-D (M, K), got ", x.dim(), "-D");
  const int64_t M = x.size(0), K = x.size(1), D = U.size(0), r = U.size(1);
  check_shapes("salt_forward", U, V, C, K);
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == D), "salt_kernels.salt_forward: bias must be (D,) = (",
              D, ",), got ", bias->sizes());
  const c10::DeviceGuard device_guard(x.device());  // ATen launches on the current device
  const auto acc = C.scalar_type();
  const auto acc_opts = x.options().dtype(acc);
  const auto gemm_t = Dev::gemm_dtype(x.scalar_type(), acc);

  Tensor Z = at::empty({M, r}, acc_opts);
  Tensor y = Dev::empty_output({M, D}, x.options());
  if (M == 0) return {y, Z};

  // Mix folded into the expand weights when M > D: y = Z C^T U^T + b = Z (U C)^T + b.
  // Otherwise T = Z C^T per block, then y = T U^T + b.
  const bool fold_mix = M > D;
  const Tensor V_g = V.to(gemm_t);
  const Tensor expand_t = (fold_mix ? at::mm(U.to(acc), C) : U).to(gemm_t).t();  // (r, D) view
  const Tensor bias_g = has_bias ? bias->to(gemm_t) : Tensor();

  // Inputs narrower or wider than the GEMM dtype (fp16 on CPU) are converted, and x
  // without a unit stride copied, a block of rows at a time.
  const bool widen = x.scalar_type() != gemm_t;
  const bool copy_x = widen || !blas_readable(x);
  const int64_t bm = copy_x ? block_rows(M, std::max(K, D), Dev::copy_block_elems) : M;
  Tensor y_gemm_buf = widen ? at::empty({std::min(bm, M), D}, x.options().dtype(gemm_t)) : Tensor();
  for (int64_t m0 = 0; m0 < M; m0 += bm) {
    const int64_t rows = std::min(bm, M - m0);
    Tensor x_blk = x.narrow(0, m0, rows);
    if (copy_x) x_blk = x_blk.to(gemm_t, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
    Tensor Z_blk = Z.narrow(0, m0, rows);
    mm_into<Dev>(Z_blk, x_blk, V_g);                                                    // shrink
    const Tensor T_g = (fold_mix ? Z_blk : at::mm(Z_blk, C.t())).to(gemm_t);           // mix (unless folded)
    Tensor y_blk = y.narrow(0, m0, rows);
    Tensor out = widen ? y_gemm_buf.narrow(0, 0, rows) : y_blk;
    if (has_bias) {
      at::addmm_out(out, bias_g, T_g, expand_t);  // expand + bias, one write of y
    } else {
      at::mm_out(out, T_g, expand_t);
    }
    if (widen) y_blk.copy_(out);
  }
  return {y, Z};
}

template <class Dev>
std::tuple<Tensor, Tensor, Tensor> salt_backward(const Tensor& G, const Tensor& Z, const Tensor& U, const Tensor& V,
                                                 const Tensor& C, bool need_dx, bool need_dC, bool need_db) {
  check_one_device("salt_backward", {{"G", &G}, {"Z", &Z}, {"U", &U}, {"V", &V}, {"C", &C}});
  TORCH_CHECK(G.dim() == 2 && Z.dim() == 2, "salt_kernels.salt_backward: G and Z must be 2-D");
  const int64_t M = G.size(0), D = G.size(1), K = V.size(0), r = U.size(1);
  check_shapes("salt_backward", U, V, C, K);
  TORCH_CHECK(U.size(0) == D && Z.size(0) == M && Z.size(1) == r, "salt_kernels.salt_backward: G (M, D) = (", M,
              ", ", U.size(0), ") and Z (M, r) = (", M, ", ", r, ") expected, got G ", G.sizes(), ", Z ", Z.sizes());
  const c10::DeviceGuard device_guard(G.device());
  const auto acc = C.scalar_type();
  const auto acc_opts = G.options().dtype(acc);
  const auto gemm_t = Dev::gemm_dtype(G.scalar_type(), acc);

  Tensor dx = need_dx ? Dev::empty_output({M, K}, G.options()) : at::empty({0}, G.options());
  Tensor dC = need_dC ? at::zeros({r, r}, acc_opts) : at::empty({0}, acc_opts);  // zero: M may be 0
  Tensor db_acc = need_db ? at::zeros({D}, acc_opts) : Tensor();
  const bool need_dT = need_dx || need_dC;
  if (M > 0 && (need_dT || need_db)) {
    const Tensor U_g = U.to(gemm_t);
    // dx = dZ V^T = dT C V^T = dT (V C^T)^T: the mix folded into the (K, r) matrix when
    // M > K (see the header), else applied to each block: dZ = dT C.
    const bool fold_mix = M > K;
    const Tensor shrink_t = !need_dx ? Tensor() : (fold_mix ? at::mm(V.to(acc), C.t()) : V).to(gemm_t).t();
    const bool widen = G.scalar_type() != gemm_t;
    const bool copy_G = widen || !blas_readable(G);
    const int64_t bm = copy_G ? block_rows(M, std::max(K, D), Dev::copy_block_elems) : M;
    Tensor dT_full = need_dT ? at::empty({M, r}, acc_opts) : Tensor();
    Tensor dx_gemm_buf = (need_dx && widen) ? at::empty({std::min(bm, M), K}, G.options().dtype(gemm_t)) : Tensor();
    for (int64_t m0 = 0; m0 < M; m0 += bm) {
      const int64_t rows = std::min(bm, M - m0);
      Tensor G_blk = G.narrow(0, m0, rows);
      if (copy_G) G_blk = G_blk.to(gemm_t, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
      if (need_db) Dev::add_column_sums(G_blk, db_acc);
      if (!need_dT) continue;
      Tensor dT = dT_full.narrow(0, m0, rows);
      mm_into<Dev>(dT, G_blk, U_g);  // dT = G U
      if (need_dx) {
        Tensor dx_blk = dx.narrow(0, m0, rows);
        Tensor out = widen ? dx_gemm_buf.narrow(0, 0, rows) : dx_blk;
        at::mm_out(out, (fold_mix ? dT : at::mm(dT, C)).to(gemm_t), shrink_t);  // dx = dZ V^T
        if (widen) dx_blk.copy_(out);
      }
    }
    if (need_dC) {
      // dC = dT^T Z over fixed slices of 1024 rows, the partials added in slice order: the
      // same sum on any number of threads. The whole slices are one batched GEMM into the
      // preallocated partials (Dev::bmm_out), a last partial slice one more GEMM.
      constexpr int64_t dC_rows = 1024;
      const int64_t whole = M / dC_rows, rest = M - whole * dC_rows, slices = whole + (rest > 0 ? 1 : 0);
      Tensor parts = slices == 1 ? dC.unsqueeze(0) : at::empty({slices, r, r}, acc_opts);
      if (whole > 0) {
        const int64_t rows = whole * dC_rows;
        Tensor out = parts.narrow(0, 0, whole);
        Dev::bmm_out(out, dT_full.narrow(0, 0, rows).view({whole, dC_rows, r}).transpose(1, 2),
                     Z.narrow(0, 0, rows).reshape({whole, dC_rows, r}));
      }
      if (rest > 0) {
        Tensor part = parts.select(0, whole);
        at::mm_out(part, dT_full.narrow(0, whole * dC_rows, rest).t(), Z.narrow(0, whole * dC_rows, rest));
      }
      if (slices > 1) Dev::sum_slices(parts, dC);
    }
  }
  Tensor db = need_db ? db_acc.to(G.scalar_type()) : at::empty({0}, G.options());
  return {dx, dC, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(salt_kernels, CPU, m) {
  m.impl("salt_forward", &salt_forward<CpuDevice>);
  m.impl("salt_backward", &salt_backward<CpuDevice>);
}

#ifdef SALT_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(salt_kernels, CUDA, m) {
  m.impl("salt_forward", &salt_forward<CudaDevice>);
  m.impl("salt_backward", &salt_backward<CudaDevice>);
}
#endif

// No tensor arguments, so no device to dispatch on: registered for every key.
TORCH_LIBRARY_IMPL(salt_kernels, CompositeImplicitAutograd, m) {
  m.impl("cpu_gemm_dtype", [](at::ScalarType dtype) {
    return CpuDevice::gemm_dtype(dtype, dtype == at::kDouble ? at::kDouble : at::kFloat);
  });
}

}  // namespace salt_kernels
