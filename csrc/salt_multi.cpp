// Many SALT adapters on one base in one batch: salt_kernels::salt_multi_forward /
// salt_multi_backward, one device-generic ATen implementation registered for CPU and CUDA.
// Contract (and autograd): salt_kernels/backends/multi_extension.py.
//
// Row m uses adapter a = adapter_index[m] (-1: the base layer, core diag(base_sigma)):
//
//   Z = x V                                   one shared shrink GEMM   (M, r)
//   T[m] = Z[m] * sigma_a + s (Z[m] Y_a^T) X_a^T                       (M, r)
//   y = T U^T + b_a                           one shared expand GEMM   (M, D)
//
// The mix is a loop over the adapters present: the rows are sorted by adapter (stable),
// each adapter's rows form one contiguous segment of the sorted Z, and a segment costs
// three small ATen calls (mul, mm, addmm) on the factors, never an r x r core: 2 r r' + r
// FLOPs a row instead of r^2. The sort is internal: T is scattered back to the caller's
// row order before the expand. Segment boundaries are needed on the host, so on CUDA the
// op synchronises once per call (the same copy also checks the index range).
//
// Deterministic: each segment's reductions (dsigma, dX, dY, a banked db) are computed by
// one thread with single-threaded BLAS; a shared db is summed over fixed row blocks whose
// partials are added in block order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "host_output.h"

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

// MKL's C API (torch's BLAS on x86), weak so that builds against other BLAS still load.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace salt_kernels {
namespace {

using at::Tensor;

// Single-threaded BLAS on this thread while it lives: calls made from inside our own
// parallel loop must not spawn nested BLAS threads (oversubscription, and a reduction
// split across threads sums in a thread-count-dependent order).
class SerialBlas {
 public:
  SerialBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int previous_;
};

// Runs fn(i) for i in [0, n): on CPU spread over threads (each with the caller's dispatch
// state and serial BLAS), on other devices in order on the calling thread (the work is
// queued on the device stream anyway).
template <typename Fn>
void for_each_task(const at::Device& device, int64_t n, const Fn& fn) {
  if (!device.is_cpu()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    const at::ThreadLocalStateGuard guard(caller_state);
    const SerialBlas serial;
    for (int64_t i = i0; i < i1; ++i) fn(i);
  });
}

// The rows grouped by adapter: perm lists the row ids sorted by adapter index (stable),
// segment i holds perm[start[i], start[i+1]) and uses adapter adapter[i] (-1: base).
struct Segments {
  Tensor perm;
  std::vector<int64_t> adapter;
  std::vector<int64_t> start;
  int64_t size() const { return static_cast<int64_t>(adapter.size()); }
  int64_t rows(int64_t i) const { return start[i + 1] - start[i]; }
};

Segments segment_rows(const Tensor& index, int64_t A, bool has_base) {
  Segments seg;
  auto sorted = at::sort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  seg.perm = std::get<1>(sorted);
  auto uniq = at::unique_consecutive(std::get<0>(sorted), /*return_inverse=*/false, /*return_counts=*/true);
  const Tensor values = std::get<0>(uniq).cpu();  // the one host synchronisation on CUDA
  const Tensor counts = std::get<2>(uniq).cpu();
  const int64_t n = values.numel();
  const int64_t* v = values.const_data_ptr<int64_t>();
  const int64_t* c = counts.const_data_ptr<int64_t>();
  if (n > 0) {
    TORCH_CHECK(v[0] >= -1 && v[n - 1] < A, "salt_kernels: adapter_index: expected values in [-1, ", A,
                "), got values from ", v[0], " to ", v[n - 1]);
    TORCH_CHECK(v[0] >= 0 || has_base,
                "salt_kernels: adapter_index has rows -1 (the base layer) but no base_sigma was given");
  }
  seg.start.push_back(0);
  for (int64_t i = 0; i < n; ++i) {
    seg.adapter.push_back(v[i]);
    seg.start.push_back(seg.start.back() + c[i]);
  }
  return seg;
}

void check_args(const Tensor& U, const Tensor& V, const Tensor& sigma, const Tensor& X, const Tensor& Y,
                const Tensor& index, int64_t M, int64_t K) {
  TORCH_CHECK(U.dim() == 2 && V.dim() == 2 && V.size(0) == K && V.size(1) == U.size(1),
              "salt_kernels: U (D, r) and V (K, r) expected");
  const int64_t r = U.size(1);
  TORCH_CHECK(sigma.dim() == 2 && sigma.size(1) == r, "salt_kernels: sigma must be (A, r)");
  const int64_t A = sigma.size(0);
  TORCH_CHECK(X.dim() == 3 && X.size(0) == A && X.size(1) == r, "salt_kernels: X must be (A, r, r')");
  TORCH_CHECK(Y.dim() == 3 && Y.size(0) == A && Y.size(1) == X.size(2) && Y.size(2) == r,
              "salt_kernels: Y must be (A, r', r)");
  TORCH_CHECK(sigma.scalar_type() == at::kFloat || sigma.scalar_type() == at::kDouble,
              "salt_kernels: sigma, X, Y must be in the accumulation dtype (float32 or float64)");
  TORCH_CHECK(X.scalar_type() == sigma.scalar_type() && Y.scalar_type() == sigma.scalar_type(),
              "salt_kernels: sigma, X, Y must share one dtype");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == M && index.scalar_type() == at::kLong,
              "salt_kernels: adapter_index must be int64 of shape (M,)");
}

// The core of segment i applied on the right of its rows: out = rows * sig + s (rows B1) B2,
// with (B1, B2) = (Y_a^T, X_a^T) for the forward mix T = Z C_a^T and (X_a, Y_a) for the
// backward dZ = dT C_a. The base segment (a = -1) has no low-rank term.
void apply_core(Tensor& out, const Tensor& rows, const Tensor& sig, const Tensor& B1, const Tensor& B2,
                double scaling) {
  at::mul_out(out, rows, sig);
  if (B1.defined() && B1.size(1) > 0) out.addmm_(at::mm(rows, B1), B2, 1.0, scaling);
}

std::tuple<Tensor, Tensor> salt_multi_forward(const Tensor& x, const Tensor& U, const Tensor& V,
                                              const Tensor& sigma, const Tensor& X, const Tensor& Y,
                                              const std::optional<Tensor>& bias, const Tensor& adapter_index,
                                              const std::optional<Tensor>& base_sigma,
                                              const std::optional<Tensor>& base_bias, double scaling) {
  TORCH_CHECK(x.dim() == 2, "salt_kernels: x must be 2-D (M, K)");
  const int64_t M = x.size(0), K = x.size(1), D = U.size(0), A = sigma.size(0);
  check_args(U, V, sigma, X, Y, adapter_index, M, K);
  const auto acc = sigma.scalar_type();
  const bool has_bias = bias.has_value() && bias->defined();
  const bool banked_bias = has_bias && bias->dim() == 2;
  const bool has_base = base_sigma.has_value() && base_sigma->defined();

  const Tensor Z = at::mm(x, V).to(acc);  // shrink; saved for the backward
  if (M == 0) return {at::empty({0, D}, x.options()), Z};
  const Segments seg = segment_rows(adapter_index, A, has_base);

  // Mix on the rows in adapter order, then scatter back (T is only M x r). One adapter:
  // the rows are already one segment.
  const bool one = seg.size() == 1;
  const Tensor Zs = one ? Z : Z.index_select(0, seg.perm);
  Tensor Ts = at::empty_like(Zs);
  for_each_task(x.device(), seg.size(), [&](int64_t i) {
    const int64_t a = seg.adapter[i];
    Tensor out = Ts.narrow(0, seg.start[i], seg.rows(i));
    const Tensor rows = Zs.narrow(0, seg.start[i], seg.rows(i));
    if (a < 0) {
      apply_core(out, rows, *base_sigma, Tensor(), Tensor(), scaling);
    } else {
      apply_core(out, rows, sigma.select(0, a), Y.select(0, a).t(), X.select(0, a).t(), scaling);
    }
  });
  const Tensor T = (one ? Ts : at::empty_like(Ts).index_copy_(0, seg.perm, Ts)).to(x.scalar_type());

  // Expand, bias fused: a shared bias through addmm; a banked one gathered into y first
  // (base rows: base_bias or zero), then the GEMM accumulates onto it.
  Tensor y = empty_output({M, D}, x.options());
  if (!has_bias) return {at::mm_out(y, T, U.t()), Z};
  if (!banked_bias) return {at::addmm_out(y, *bias, T, U.t()), Z};
  at::index_select_out(y, *bias, 0, adapter_index.clamp_min(0));
  if (seg.adapter[0] < 0) {
    const Tensor base_rows = seg.perm.narrow(0, 0, seg.rows(0));
    const bool has_base_bias = base_bias.has_value() && base_bias->defined();
    y.index_copy_(0, base_rows, has_base_bias ? base_bias->expand({seg.rows(0), D}) : at::zeros({seg.rows(0), D}, x.options()));
  }
  y.addmm_(T, U.t());
  return {y, Z};
}

// Column sums of G (M, D) in dtype acc over fixed row blocks, added in block order.
Tensor column_sums(const Tensor& G, at::ScalarType acc) {
  const int64_t M = G.size(0), block = 1024, blocks = (M + block - 1) / block;
  Tensor parts = at::zeros({std::max<int64_t>(blocks, 1), G.size(1)}, G.options().dtype(acc));
  for_each_task(G.device(), blocks, [&](int64_t b) {
    Tensor part = parts.select(0, b);
    part.copy_(G.narrow(0, b * block, std::min(block, M - b * block)).sum({0}, false, acc));
  });
  Tensor out = parts.select(0, 0).clone();
  for (int64_t b = 1; b < blocks; ++b) out.add_(parts.select(0, b));
  return out;
}

// Outputs: dx (M, K); dsigma (A + 1, r) (row A: base_sigma); dX (A, r, r'); dY (A, r', r);
// db (A + 1, D) for a banked bias (row A: base_bias), (D,) for a shared one. Unrequested
// outputs are empty.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> salt_multi_backward(
    const Tensor& G, const Tensor& Z, const Tensor& U, const Tensor& V, const Tensor& sigma, const Tensor& X,
    const Tensor& Y, const Tensor& adapter_index, const std::optional<Tensor>& base_sigma, double scaling,
    int64_t bias_kind, bool need_dx, bool need_dcore, bool need_db) {
  TORCH_CHECK(G.dim() == 2 && Z.dim() == 2, "salt_kernels: G and Z must be 2-D");
  const int64_t M = G.size(0), D = G.size(1), K = V.size(0), r = U.size(1), A = sigma.size(0);
  const int64_t rl = X.size(2);
  check_args(U, V, sigma, X, Y, adapter_index, M, K);
  TORCH_CHECK(U.size(0) == D && Z.size(0) == M && Z.size(1) == r, "salt_kernels: G (M, D), Z (M, r) expected");
  TORCH_CHECK(bias_kind >= 0 && bias_kind <= 2, "salt_kernels: bias_kind is 0 (none), 1 (shared) or 2 (banked)");
  const auto acc = sigma.scalar_type();
  const auto acc_opts = G.options().dtype(acc);
  const bool has_base = base_sigma.has_value() && base_sigma->defined();
  need_db = need_db && bias_kind > 0;

  Tensor dx = at::empty({0}, G.options()), db = at::empty({0}, G.options());
  Tensor dsigma = need_dcore ? at::zeros({A + 1, r}, acc_opts) : at::empty({0}, acc_opts);
  Tensor dX = need_dcore ? at::zeros({A, r, rl}, acc_opts) : at::empty({0}, acc_opts);
  Tensor dY = need_dcore ? at::zeros({A, rl, r}, acc_opts) : at::empty({0}, acc_opts);
  Tensor db_acc = need_db && bias_kind == 2 ? at::zeros({A + 1, D}, acc_opts) : Tensor();
  if (need_dx && M == 0) dx = at::empty({0, K}, G.options());
  if (need_db && bias_kind == 1) db = M == 0 ? at::zeros({D}, G.options()) : column_sums(G, acc).to(G.scalar_type());
  const bool banked_db = need_db && bias_kind == 2;
  if (M == 0 || !(need_dx || need_dcore || banked_db)) {
    if (banked_db) db = db_acc.to(G.scalar_type());
    return {dx, dsigma, dX, dY, db};
  }
  const Segments seg = segment_rows(adapter_index, A, has_base);
  const bool need_dT = need_dx || need_dcore, one = seg.size() == 1;
  const auto sorted = [&](const Tensor& t) { return one ? t : t.index_select(0, seg.perm); };
  const Tensor dTs = need_dT ? sorted(at::mm(G, U).to(acc)) : Tensor();
  const Tensor Zs = need_dcore ? sorted(Z) : Tensor();
  Tensor dZs = need_dx ? at::empty_like(dTs) : Tensor();
  for_each_task(G.device(), seg.size(), [&](int64_t i) {
    const int64_t a = seg.adapter[i], s0 = seg.start[i], n = seg.rows(i);
    const int64_t slot = a < 0 ? A : a;  // dsigma / db row
    const Tensor dT = need_dT ? dTs.narrow(0, s0, n) : Tensor();
    if (need_dx) {  // dZ = dT C_a
      Tensor out = dZs.narrow(0, s0, n);
      if (a < 0) {
        apply_core(out, dT, *base_sigma, Tensor(), Tensor(), scaling);
      } else {
        apply_core(out, dT, sigma.select(0, a), X.select(0, a), Y.select(0, a), scaling);
      }
    }
    if (need_dcore) {  // dC_a = dT^T Z, only through its factors
      const Tensor z = Zs.narrow(0, s0, n);
      Tensor ds = dsigma.select(0, slot);
      ds.copy_((dT * z).sum({0}));
      if (a >= 0 && rl > 0) {
        Tensor dXa = dX.select(0, a), dYa = dY.select(0, a);
        at::mm_out(dXa, dT.t(), at::mm(z, Y.select(0, a).t())).mul_(scaling);  // s dT^T (Z Y^T)
        at::mm_out(dYa, at::mm(dT, X.select(0, a)).t(), z).mul_(scaling);      // s (dT X)^T Z
      }
    }
    if (banked_db) {
      Tensor dba = db_acc.select(0, slot);
      dba.copy_((one ? G : G.index_select(0, seg.perm.narrow(0, s0, n))).sum({0}, false, acc));
    }
  });
  if (need_dx) {
    const Tensor dZ = (one ? dZs : at::empty_like(dZs).index_copy_(0, seg.perm, dZs)).to(G.scalar_type());
    dx = empty_output({M, K}, G.options());
    at::mm_out(dx, dZ, V.t());
  }
  if (banked_db) db = db_acc.to(G.scalar_type());
  return {dx, dsigma, dX, dY, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(salt_kernels, m) {
  // (y, Z): y (M, D) in x's dtype, Z = x V (M, r) in sigma's dtype, saved for backward.
  // sigma (A, r), X (A, r, r'), Y (A, r', r) in the accumulation dtype; bias (D,) or (A, D);
  // adapter_index int64 (M,) in [-1, A); -1 rows use base_sigma (r,) and base_bias (D,).
  m.def(
      "salt_multi_forward(Tensor x, Tensor U, Tensor V, Tensor sigma, Tensor X, Tensor Y, Tensor? bias, "
      "Tensor adapter_index, Tensor? base_sigma, Tensor? base_bias, float scaling) -> (Tensor, Tensor)");
  // (dx, dsigma (A+1, r), dX, dY, db): bias_kind 0 none, 1 shared (D,), 2 banked (A+1, D).
  m.def(
      "salt_multi_backward(Tensor G, Tensor Z, Tensor U, Tensor V, Tensor sigma, Tensor X, Tensor Y, "
      "Tensor adapter_index, Tensor? base_sigma, float scaling, int bias_kind, bool need_dx, "
      "bool need_dcore, bool need_db) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(salt_kernels, CPU, m) {
  m.impl("salt_multi_forward", &salt_multi_forward);
  m.impl("salt_multi_backward", &salt_multi_backward);
}

TORCH_LIBRARY_IMPL(salt_kernels, CUDA, m) {
  m.impl("salt_multi_forward", &salt_multi_forward);
  m.impl("salt_multi_backward", &salt_multi_backward);
}

}  // namespace salt_kernels
