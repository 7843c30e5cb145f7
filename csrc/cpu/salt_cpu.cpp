// CPU kernels of salt_kernels::salt_forward / salt_backward (schemas in ../salt_ops.cpp).
//
// The M rows are cut into fixed-size row blocks processed in parallel (at::parallel_for);
// each block runs single-threaded BLAS calls on data that stays in cache, so
//  * the r x r mix is folded into the small basis matrices once per call
//    (y = Z (U C)^T + b, dx = dT (V C^T)^T), instead of an extra M x r pass;
//  * bias is fused into the expand GEMM (addmm), db and dC are reduced from the same
//    block of G that feeds dT = G U, while it is still in cache;
//  * fp16/bf16 rows are widened to fp32 one block at a time: no M x K or M x D fp32
//    temporaries, only the outputs themselves;
//  * reductions over M (dC, db) go through per-block partials summed in a fixed order,
//    and the block size depends on M only, so results are bitwise reproducible whatever
//    the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

// MKL (torch's BLAS on x86) runs with dynamic threading off (torch sets that), so a
// GEMM issued from inside our parallel region would open a nested OpenMP team whose
// spin-waiting costs several times the GEMM on a busy machine. Each of our threads asks
// MKL for one thread. Weak: absent (other BLAS, e.g. OpenBLAS, is serial there) -> no-op.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // C API (the lower-case name is Fortran)

namespace salt_kernels {
namespace {

// Makes BLAS calls on this thread single-threaded for the guard's lifetime.
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

using at::Tensor;

// Rows per block. Depends on M only (never on the thread count) so that the partial
// sums, and hence dC and db, are identical on any machine configuration.
int64_t block_rows(int64_t M) {
  return std::clamp<int64_t>((M + 7) / 8, 16, 128);
}

// Outputs of 32 MiB and more: glibc serves these with a fresh mmap on every call (32 MiB
// is its largest mmap threshold), so each 4 KiB page is faulted and zeroed while the
// GEMM writes it, which costs as much as the GEMM itself (DESIGN.md section 6). Backing
// them with transparent huge pages (MADV_HUGEPAGE) cuts the page faults 512-fold.
// Smaller outputs come from the ordinary allocator, which recycles warm memory.
constexpr size_t kHugePageBytes = size_t{2} << 20;
constexpr size_t kHugePageMinBytes = size_t{32} << 20;

// SALT_KERNELS_NO_HUGEPAGES=1 turns this off (e.g. to measure what it buys).
bool hugepages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("SALT_KERNELS_NO_HUGEPAGES");
    return v == nullptr || v[0] == '\0' || v[0] == '0';
  }();
  return enabled;
}

Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef __linux__
  if (!hugepages_enabled()) return at::empty(sizes, options);
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * at::elementSize(at::typeMetaToScalarType(options.dtype()));
  if (bytes >= kHugePageMinBytes) {
    const size_t padded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void* data = std::aligned_alloc(kHugePageBytes, padded);
    if (data != nullptr) {
      madvise(data, padded, MADV_HUGEPAGE);  // a hint: failure only costs speed
      return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

void check_common(const Tensor& U, const Tensor& V, const Tensor& C, int64_t K) {
  TORCH_CHECK(U.dim() == 2 && V.dim() == 2 && C.dim() == 2, "salt_kernels: U, V, C must be 2-D");
  const int64_t r = U.size(1);
  TORCH_CHECK(V.size(0) == K && V.size(1) == r, "salt_kernels: V must be (K, r)");
  TORCH_CHECK(C.size(0) == r && C.size(1) == r, "salt_kernels: C must be (r, r)");
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble,
              "salt_kernels: C must be float32 or float64 (the accumulation dtype)");
}

// Runs body(worker_state, b) for every row block b in [0, nblocks). Threads take blocks
// from a shared counter rather than a fixed half each: on a shared machine a descheduled
// thread then delays the call by one block, not by half the work. Which thread computes
// a block never changes its result (each block writes only its own rows / partial).
template <typename MakeState, typename Body>
void for_each_block(int64_t nblocks, const MakeState& make_state, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), nblocks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    SerialBlasGuard serial_blas;
    auto state = make_state();
    for (int64_t b = next.fetch_add(1); b < nblocks; b = next.fetch_add(1)) body(state, b);
  });
}

// out[j] = sum_b partials[b][j], always summed in block order (deterministic).
void sum_partials_in_order(const Tensor& partials, Tensor& out) {
  const int64_t nb = partials.size(0), n = partials.size(1);
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "salt_sum_partials", [&] {
    const scalar_t* p = partials.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 2048, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) o[j] = p[j];
      for (int64_t b = 1; b < nb; ++b) {
        const scalar_t* row = p + b * n;
        for (int64_t j = j0; j < j1; ++j) o[j] += row[j];
      }
    });
  });
}

std::tuple<Tensor, Tensor> salt_forward_cpu(const Tensor& x, const Tensor& U, const Tensor& V,
                                            const Tensor& C, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "salt_kernels: x must be 2-D (M, K)");
  const int64_t M = x.size(0), K = x.size(1), D = U.size(0), r = U.size(1);
  check_common(U, V, C, K);
  const auto acc = C.scalar_type();
  const auto acc_opts = x.options().dtype(acc);

  // The mix folded into the expand weights: y = Z C^T U^T + b = Z (U C)^T + b.
  const Tensor V_acc = V.to(acc);
  const Tensor UC_t = at::mm(U.to(acc), C).t();  // (r, D), transposed view: BLAS reads it as is
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor bias_acc = has_bias ? bias->to(acc) : Tensor();

  Tensor Z = at::empty({M, r}, acc_opts);
  Tensor y = empty_output({M, D}, x.options());
  if (M == 0) return {y, Z};

  const bool widen = x.scalar_type() != acc;  // fp16/bf16: compute each block in fp32
  const int64_t bm = block_rows(M), nblocks = (M + bm - 1) / bm;
  for_each_block(
      nblocks, [&] { return widen ? at::empty({bm, D}, acc_opts) : Tensor(); },
      [&](Tensor& y_acc_buf, int64_t b) {
        const int64_t m0 = b * bm, rows = std::min(bm, M - m0);
        Tensor x_blk = x.narrow(0, m0, rows);
        if (widen) x_blk = x_blk.to(acc);
        Tensor Z_blk = Z.narrow(0, m0, rows);
        at::mm_out(Z_blk, x_blk, V_acc);  // shrink
        Tensor y_blk = y.narrow(0, m0, rows);
        Tensor out = widen ? y_acc_buf.narrow(0, 0, rows) : y_blk;
        if (has_bias) {
          at::addmm_out(out, bias_acc, Z_blk, UC_t);  // mix + expand + bias
        } else {
          at::mm_out(out, Z_blk, UC_t);
        }
        if (widen) y_blk.copy_(out);
      });
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

  Tensor dx = need_dx ? empty_output({M, K}, G.options()) : at::empty({0}, G.options());
  Tensor dC = need_dC ? at::zeros({r, r}, acc_opts) : at::empty({0}, acc_opts);
  Tensor db = need_db ? at::zeros({D}, G.options()) : at::empty({0}, G.options());
  if (M == 0 || !(need_dx || need_dC || need_db)) return {dx, dC, db};

  const bool need_dT = need_dx || need_dC;
  const Tensor U_acc = U.to(acc);
  // dx = dZ V^T = dT C V^T = dT (V C^T)^T: the mix folded into the small (K, r) matrix.
  const Tensor VCt_t = need_dx ? at::mm(V.to(acc), C.t()).t() : Tensor();  // (r, K) view
  const bool widen = G.scalar_type() != acc;

  const int64_t bm = block_rows(M), nblocks = (M + bm - 1) / bm;
  Tensor dC_partials = need_dC ? at::empty({nblocks, r * r}, acc_opts) : Tensor();
  Tensor db_partials = need_db ? at::empty({nblocks, D}, acc_opts) : Tensor();

  struct Buffers {
    Tensor dT, dx_acc;
  };
  for_each_block(
      nblocks,
      [&] {
        return Buffers{need_dT ? at::empty({bm, r}, acc_opts) : Tensor(),
                       (need_dx && widen) ? at::empty({bm, K}, acc_opts) : Tensor()};
      },
      [&](Buffers& buf, int64_t b) {
        const int64_t m0 = b * bm, rows = std::min(bm, M - m0);
        Tensor G_blk = G.narrow(0, m0, rows);
        if (widen) G_blk = G_blk.to(acc);
        if (need_db) {
          Tensor part = db_partials.select(0, b);
          at::sum_out(part, G_blk, {0});
        }
        if (!need_dT) return;
        Tensor dT = buf.dT.narrow(0, 0, rows);
        at::mm_out(dT, G_blk, U_acc);  // dT = G U
        if (need_dC) {
          Tensor part = dC_partials.select(0, b).view({r, r});
          at::mm_out(part, dT.t(), Z.narrow(0, m0, rows));  // this block's dT^T Z
        }
        if (need_dx) {
          Tensor dx_blk = dx.narrow(0, m0, rows);
          Tensor out = widen ? buf.dx_acc.narrow(0, 0, rows) : dx_blk;
          at::mm_out(out, dT, VCt_t);
          if (widen) dx_blk.copy_(out);
        }
      });

  if (need_dC) {
    Tensor flat = dC.view({r * r});
    sum_partials_in_order(dC_partials, flat);
  }
  if (need_db) {
    if (widen) {
      Tensor db_acc = at::empty({D}, acc_opts);
      sum_partials_in_order(db_partials, db_acc);
      db.copy_(db_acc);
    } else {
      sum_partials_in_order(db_partials, db);
    }
  }
  return {dx, dC, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(salt_kernels, CPU, m) {
  m.impl("salt_forward", &salt_forward_cpu);
  m.impl("salt_backward", &salt_backward_cpu);
}

}  // namespace salt_kernels
