// Many SALT adapters on one base in one batch: salt_kernels::salt_multi_forward /
// salt_multi_backward, one implementation over the device structs of device.h,
// registered for CPU and CUDA. Contract (and autograd): salt_kernels/backends/extension/multi.py.
//
// Row m uses adapter a = adapter_index[m] (-1: the base layer, core diag(base_sigma)):
//
//   Z = x V                                   one shared shrink GEMM   (M, r)
//   T[m] = Z[m] * sigma_a + s (Z[m] Y_a^T) X_a^T                       (M, r)
//   y = T U^T + b_a                           one shared expand GEMM   (M, D)
//
// The mix (and the backward's dZ = dT C_a) is Dev::mix_rows: each row goes through its own
// adapter's factors (mix_rows.h), in the caller's row order, never an r x r core: 2 r r' + r
// FLOPs a row, no sorting, no gather or scatter of rows. Only the backward's per-adapter
// reductions (dsigma, dX, dY, a banked db) group the rows by adapter (a stable sort) and
// reduce each adapter's segment on one thread with single-threaded BLAS, so the result
// does not depend on the thread count. The index range is checked with one aminmax on the
// CPU and a device-side assert on CUDA: the forward reads nothing on the host.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "device.h"
#include "op_checks.h"

namespace salt_kernels {
namespace {

using at::Tensor;

// The rows grouped by adapter: perm lists the row ids sorted by adapter index (stable),
// segment i holds perm[start[i], start[i+1]) and uses adapter adapter[i] (-1: base).
struct Segments {
  Tensor perm;
  std::vector<int64_t> adapter;
  std::vector<int64_t> start;
  int64_t size() const { return static_cast<int64_t>(adapter.size()); }
  int64_t rows(int64_t i) const { return start[i + 1] - start[i]; }
};

Segments segment_rows(const Tensor& index) {
  Segments seg;
  auto sorted = at::sort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  seg.perm = std::get<1>(sorted);
  auto uniq = at::unique_consecutive(std::get<0>(sorted), /*return_inverse=*/false, /*return_counts=*/true);
  const Tensor values = std::get<0>(uniq).cpu();
  const Tensor counts = std::get<2>(uniq).cpu();
  const int64_t* v = values.const_data_ptr<int64_t>();
  const int64_t* c = counts.const_data_ptr<int64_t>();
  seg.start.push_back(0);
  for (int64_t i = 0; i < values.numel(); ++i) {
    seg.adapter.push_back(v[i]);
    seg.start.push_back(seg.start.back() + c[i]);
  }
  return seg;
}

// Every index in [-1, A), -1 only with a base_sigma. On the CPU the values are read here;
// on a GPU that read would be a host synchronisation, so the check is a device-side assert
// (the Python entry point has already checked the range on the host, unless told not to).
void check_index_range(const Tensor& index, int64_t A, bool has_base) {
  if (index.numel() == 0) return;
  if (!index.is_cpu()) {
    const int64_t low = has_base ? -1 : 0;
    at::_assert_async(at::logical_and(index >= low, index < A).all(),
                      "salt_kernels: adapter_index: expected values in [" + std::to_string(low) + ", " +
                          std::to_string(A) + ")");
    return;
  }
  const auto [lo, hi] = at::aminmax(index);
  const Tensor bounds = at::stack({lo, hi}).cpu();
  const int64_t l = bounds[0].item<int64_t>(), h = bounds[1].item<int64_t>();
  TORCH_CHECK(l >= -1 && h < A, "salt_kernels: adapter_index: expected values in [-1, ", A, "), got values from ",
              l, " to ", h);
  TORCH_CHECK(l >= 0 || has_base,
              "salt_kernels: adapter_index has rows -1 (the base layer) but no base_sigma was given");
}

// Shapes and dtypes (sizes of x / G are checked by the callers), and one device for all.
void check_args(const char* op, const Tensor& first, const char* first_name, const Tensor& U, const Tensor& V,
                const Tensor& sigma, const Tensor& X, const Tensor& Y, const Tensor& index,
                const std::optional<Tensor>& base_sigma, int64_t M, int64_t K) {
  check_one_device(op, {{first_name, &first}, {"U", &U}, {"V", &V}, {"sigma", &sigma}, {"X", &X}, {"Y", &Y},
                        {"adapter_index", &index}, {"base_sigma", base_sigma ? &*base_sigma : nullptr}});
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
  TORCH_CHECK(!base_sigma || !base_sigma->defined() ||
                  (base_sigma->dim() == 1 && base_sigma->size(0) == r && base_sigma->scalar_type() == sigma.scalar_type()),
              "salt_kernels: base_sigma must be (r,) in sigma's dtype");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == M && index.scalar_type() == at::kLong,
              "salt_kernels: adapter_index must be int64 of shape (M,)");
}

// out[m] = C_a in[m] (forward) or C_a^T in[m] (backward) for every row, through the
// factors (mix_rows.h), into a fresh contiguous (M, r) tensor.
template <class Dev>
Tensor mix(const Tensor& in, const Tensor& index, const Tensor& sigma, const Tensor& X, const Tensor& Y,
           const std::optional<Tensor>& base_sigma, double scaling, bool transpose_core) {
  const Tensor Xt = X.transpose(1, 2).contiguous();  // (A, r', r): r-long rows, as mix_row reads them
  const Tensor Yc = Y.contiguous();
  Tensor out = at::empty({in.size(0), in.size(1)}, in.options());
  Dev::mix_rows(in.contiguous(), index.contiguous(), sigma.contiguous(), transpose_core ? Xt : Yc,
                transpose_core ? Yc : Xt, base_sigma ? base_sigma->contiguous() : Tensor(), scaling, out);
  return out;
}

template <class Dev>
std::tuple<Tensor, Tensor> salt_multi_forward(const Tensor& x, const Tensor& U, const Tensor& V,
                                              const Tensor& sigma, const Tensor& X, const Tensor& Y,
                                              const std::optional<Tensor>& bias, const Tensor& adapter_index,
                                              const std::optional<Tensor>& base_sigma,
                                              const std::optional<Tensor>& base_bias, double scaling) {
  TORCH_CHECK(x.dim() == 2, "salt_kernels: x must be 2-D (M, K)");
  const int64_t M = x.size(0), K = x.size(1), D = U.size(0), A = sigma.size(0);
  check_args("salt_multi_forward", x, "x", U, V, sigma, X, Y, adapter_index, base_sigma, M, K);
  check_one_device("salt_multi_forward", {{"x", &x}, {"bias", bias ? &*bias : nullptr},
                                          {"base_bias", base_bias ? &*base_bias : nullptr}});
  const c10::DeviceGuard device_guard(x.device());  // ATen launches on the current device
  const auto acc = sigma.scalar_type();
  const bool has_bias = bias.has_value() && bias->defined();
  const bool banked_bias = has_bias && bias->dim() == 2;
  const bool has_base = base_sigma.has_value() && base_sigma->defined();

  const Tensor Z = at::mm(x, V).to(acc);  // shrink; saved for the backward
  if (M == 0) return {at::empty({0, D}, x.options()), Z};
  check_index_range(adapter_index, A, has_base);
  const Tensor T = mix<Dev>(Z, adapter_index, sigma, X, Y, base_sigma, scaling, false).to(x.scalar_type());

  // Expand, bias fused: a shared bias through addmm; a banked one gathered into y first,
  // then the GEMM accumulates onto it. With a base_sigma, rows -1 take row A of the bank
  // extended by base_bias (or zero): which rows are -1 is never read on the host.
  Tensor y = Dev::empty_output({M, D}, x.options());
  if (!has_bias) return {at::mm_out(y, T, U.t()), Z};
  if (!banked_bias) return {at::addmm_out(y, *bias, T, U.t()), Z};
  if (has_base) {
    const bool has_base_bias = base_bias.has_value() && base_bias->defined();
    const Tensor base_row = has_base_bias ? base_bias->reshape({1, D}).to(bias->scalar_type()) : at::zeros({1, D}, bias->options());
    at::index_select_out(y, at::cat({*bias, base_row}, 0), 0, at::where(adapter_index < 0, A, adapter_index));
  } else {
    at::index_select_out(y, *bias, 0, adapter_index);
  }
  y.addmm_(T, U.t());
  return {y, Z};
}

// Outputs: dx (M, K); dsigma (A + 1, r) (row A: base_sigma); dX (A, r, r'); dY (A, r', r);
// db (A + 1, D) for a banked bias (row A: base_bias), (D,) for a shared one. Unrequested
// outputs are empty.
template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> salt_multi_backward(
    const Tensor& G, const Tensor& Z, const Tensor& U, const Tensor& V, const Tensor& sigma, const Tensor& X,
    const Tensor& Y, const Tensor& adapter_index, const std::optional<Tensor>& base_sigma, double scaling,
    int64_t bias_kind, bool need_dx, bool need_dcore, bool need_db) {
  TORCH_CHECK(G.dim() == 2 && Z.dim() == 2, "salt_kernels: G and Z must be 2-D");
  const int64_t M = G.size(0), D = G.size(1), K = V.size(0), r = U.size(1), A = sigma.size(0);
  const int64_t rl = X.size(2);
  check_args("salt_multi_backward", G, "G", U, V, sigma, X, Y, adapter_index, base_sigma, M, K);
  check_one_device("salt_multi_backward", {{"G", &G}, {"Z", &Z}});
  const c10::DeviceGuard device_guard(G.device());
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
  if (need_db && bias_kind == 1) {
    Tensor sums = at::zeros({D}, acc_opts);
    if (M > 0) Dev::add_column_sums(G, sums);
    db = sums.to(G.scalar_type());
  }
  const bool banked_db = need_db && bias_kind == 2;
  if (M == 0 || !(need_dx || need_dcore || banked_db)) {
    if (banked_db) db = db_acc.to(G.scalar_type());
    return {dx, dsigma, dX, dY, db};
  }
  check_index_range(adapter_index, A, has_base);
  const Tensor dT = need_dx || need_dcore ? at::mm(G, U).to(acc) : Tensor();
  if (need_dx) {  // dZ = dT C_a, row by row
    const Tensor dZ = mix<Dev>(dT, adapter_index, sigma, X, Y, base_sigma, scaling, true).to(G.scalar_type());
    dx = Dev::empty_output({M, K}, G.options());
    at::mm_out(dx, dZ, V.t());
  }
  if (!(need_dcore || banked_db)) return {dx, dsigma, dX, dY, db};

  // Per-adapter reductions: each adapter's rows as one contiguous segment, one thread each.
  const Segments seg = segment_rows(adapter_index);
  const bool one = seg.size() == 1;
  const auto sorted = [&](const Tensor& t) { return one ? t : t.index_select(0, seg.perm); };
  const Tensor dTs = need_dcore ? sorted(dT) : Tensor();
  const Tensor Zs = need_dcore ? sorted(Z) : Tensor();
  Dev::for_each_slice(seg.size(), [&](int64_t i) {
    const int64_t a = seg.adapter[i], s0 = seg.start[i], n = seg.rows(i);
    const int64_t slot = a < 0 ? A : a;  // dsigma / db row
    if (need_dcore) {  // dC_a = dT^T Z, only through its factors
      const Tensor dt = dTs.narrow(0, s0, n), z = Zs.narrow(0, s0, n);
      Tensor ds = dsigma.select(0, slot);
      ds.copy_((dt * z).sum({0}));
      if (a >= 0 && rl > 0) {
        Tensor dXa = dX.select(0, a), dYa = dY.select(0, a);
        at::mm_out(dXa, dt.t(), at::mm(z, Y.select(0, a).t())).mul_(scaling);  // s dT^T (Z Y^T)
        at::mm_out(dYa, at::mm(dt, X.select(0, a)).t(), z).mul_(scaling);      // s (dT X)^T Z
      }
    }
    if (banked_db) {
      Tensor dba = db_acc.select(0, slot);
      dba.copy_((one ? G : G.index_select(0, seg.perm.narrow(0, s0, n))).sum({0}, false, acc));
    }
  });
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
  m.impl("salt_multi_forward", &salt_multi_forward<CpuDevice>);
  m.impl("salt_multi_backward", &salt_multi_backward<CpuDevice>);
}

#ifdef SALT_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(salt_kernels, CUDA, m) {
  m.impl("salt_multi_forward", &salt_multi_forward<CudaDevice>);
  m.impl("salt_multi_backward", &salt_multi_backward<CudaDevice>);
}
#endif

}  // namespace salt_kernels
