// CUDA kernels of salt_kernels::salt_forward / salt_backward (schemas in ../salt_ops.cpp):
// a thin binding that checks shapes, allocates outputs and launches the torch-free
// device code of salt_device.cuh on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "salt_device.cuh"

namespace salt_kernels {
namespace {

using at::Tensor;

// at:: scalar types -> the CUDA types the device code uses (same bit layout).
template <typename T> struct DeviceType { using type = T; };
template <> struct DeviceType<at::Half> { using type = __half; };
template <> struct DeviceType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
auto dptr(const Tensor& t) { return reinterpret_cast<const typename DeviceType<T>::type*>(t.const_data_ptr<T>()); }
template <typename T>
auto mptr(Tensor& t) { return reinterpret_cast<typename DeviceType<T>::type*>(t.mutable_data_ptr<T>()); }

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "salt_kernels CUDA launch failed: ", cudaGetErrorString(err)); }

void check_inputs(const Tensor& U, const Tensor& V, const Tensor& C, int64_t K) {
  TORCH_CHECK(U.dim() == 2 && V.dim() == 2 && C.dim() == 2, "salt_kernels: U, V, C must be 2-D");
  const int64_t r = U.size(1);
  TORCH_CHECK(V.size(0) == K && V.size(1) == r, "salt_kernels: V must be (K, r)");
  TORCH_CHECK(C.size(0) == r && C.size(1) == r, "salt_kernels: C must be (r, r)");
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble,
              "salt_kernels: C must be float32 or float64");
}

// C's dtype is the accumulation dtype: fp64 for fp64 inputs, fp32 otherwise (autograd.py).
void check_acc(const Tensor& t, const Tensor& C) {
  const auto want = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(C.scalar_type() == want, "salt_kernels (CUDA): C must be ", want, " for ", t.scalar_type(),
              " inputs, got ", C.scalar_type());
}

std::tuple<Tensor, Tensor> salt_forward_cuda(const Tensor& x, const Tensor& U, const Tensor& V, const Tensor& C,
                                             const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "salt_kernels: x must be 2-D (M, K)");
  const int64_t M = x.size(0), K = x.size(1), D = U.size(0), r = U.size(1);
  check_inputs(U, V, C, K);
  check_acc(x, C);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const auto acc = C.scalar_type();
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor bias_c = has_bias ? bias->contiguous() : Tensor();  // (D,): the kernel reads it densely
  Tensor Z = at::empty({M, r}, x.options().dtype(acc));
  Tensor y = at::empty({M, D}, x.options());
  Tensor UC = at::empty({D, r}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "salt_forward_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    auto run = [&](auto acc_zero) {
      using Acc = decltype(acc_zero);
      // UC = U C (D x r): the mix folded into the expand weights, y = Z (U C)^T + b.
      check(salt_cuda::launch_gemm_nt<T, Acc, Acc, Acc>(dptr<scalar_t>(U), U.stride(0), U.stride(1),
            C.const_data_ptr<Acc>(), C.stride(1), C.stride(0), nullptr, UC.mutable_data_ptr<Acc>(), r, D, r, r,
            1, 0, stream));
      // shrink: Z = x V  (B[n=j, k] = V[k, j])
      check(salt_cuda::launch_gemm_nt<T, T, Acc, Acc>(dptr<scalar_t>(x), x.stride(0), x.stride(1),
            dptr<scalar_t>(V), V.stride(1), V.stride(0), nullptr, Z.mutable_data_ptr<Acc>(), r, M, r, K,
            1, 0, stream));
      // expand with bias: y = Z UC^T + b
      check(salt_cuda::launch_gemm_nt<Acc, Acc, T, Acc>(Z.const_data_ptr<Acc>(), r, 1, UC.const_data_ptr<Acc>(),
            r, 1, has_bias ? dptr<scalar_t>(bias_c) : nullptr, mptr<scalar_t>(y), D, M, D, r, 1, 0, stream));
    };
    run(std::conditional_t<std::is_same_v<scalar_t, double>, double, float>(0));
  });
  return {y, Z};
}

std::tuple<Tensor, Tensor, Tensor> salt_backward_cuda(const Tensor& G, const Tensor& Z, const Tensor& U,
                                                      const Tensor& V, const Tensor& C, bool need_dx,
                                                      bool need_dC, bool need_db) {
  TORCH_CHECK(G.dim() == 2 && Z.dim() == 2, "salt_kernels: G and Z must be 2-D");
  const int64_t M = G.size(0), D = G.size(1), K = V.size(0), r = U.size(1);
  check_inputs(U, V, C, K);
  check_acc(G, C);
  TORCH_CHECK(U.size(0) == D && Z.size(0) == M && Z.size(1) == r, "salt_kernels: G (M, D), Z (M, r) expected");
  const c10::cuda::CUDAGuard guard(G.device());
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const auto acc = C.scalar_type();
  const auto acc_opts = G.options().dtype(acc);
  Tensor dx = need_dx ? at::empty({M, K}, G.options()) : at::empty({0}, G.options());
  Tensor dC = need_dC ? at::empty({r, r}, acc_opts) : at::empty({0}, acc_opts);
  Tensor db = need_db ? at::empty({D}, G.options()) : at::empty({0}, G.options());
  const int64_t chunks = salt_cuda::reduction_chunks(M);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "salt_backward_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    auto run = [&](auto acc_zero) {
      using Acc = decltype(acc_zero);
      if (need_db) {
        Tensor partials = at::empty({chunks, D}, acc_opts);
        check(salt_cuda::launch_column_sum_partials<T, Acc>(dptr<scalar_t>(G), M, D, G.stride(0), G.stride(1),
              chunks, partials.mutable_data_ptr<Acc>(), stream));
        check(salt_cuda::launch_sum_partials<Acc, T>(partials.const_data_ptr<Acc>(), chunks, D, mptr<scalar_t>(db),
              stream));
      }
      if (!(need_dx || need_dC)) return;
      // dT = G U  (B[n=j, k=d] = U[d, j])
      Tensor dT = at::empty({M, r}, acc_opts);
      check(salt_cuda::launch_gemm_nt<T, T, Acc, Acc>(dptr<scalar_t>(G), G.stride(0), G.stride(1),
            dptr<scalar_t>(U), U.stride(1), U.stride(0), nullptr, dT.mutable_data_ptr<Acc>(), r, M, r, D,
            1, 0, stream));
      if (need_dC) {
        // dC = dT^T Z, split over row chunks into partials summed in order.
        // A[i, m] = dT[m, i], B[j, m] = Z[m, j].
        Tensor partials = at::empty({chunks, r * r}, acc_opts);
        check(salt_cuda::launch_gemm_nt<Acc, Acc, Acc, Acc>(dT.const_data_ptr<Acc>(), 1, r,
              Z.const_data_ptr<Acc>(), Z.stride(1), Z.stride(0), nullptr, partials.mutable_data_ptr<Acc>(), r,
              r, r, M, chunks, r * r, stream));
        check(salt_cuda::launch_sum_partials<Acc, Acc>(partials.const_data_ptr<Acc>(), chunks, r * r,
              dC.mutable_data_ptr<Acc>(), stream));
      }
      if (need_dx) {
        // dx = dT C V^T = dT (V C^T)^T; VC = V C^T (K x r): A = V, B[n=j, k=i] = C[j, i].
        Tensor VC = at::empty({K, r}, acc_opts);
        check(salt_cuda::launch_gemm_nt<T, Acc, Acc, Acc>(dptr<scalar_t>(V), V.stride(0), V.stride(1),
              C.const_data_ptr<Acc>(), C.stride(0), C.stride(1), nullptr, VC.mutable_data_ptr<Acc>(), r, K, r, r,
              1, 0, stream));
        check(salt_cuda::launch_gemm_nt<Acc, Acc, T, Acc>(dT.const_data_ptr<Acc>(), r, 1, VC.const_data_ptr<Acc>(),
              r, 1, nullptr, mptr<scalar_t>(dx), K, M, K, r, 1, 0, stream));
      }
    };
    run(std::conditional_t<std::is_same_v<scalar_t, double>, double, float>(0));
  });
  return {dx, dC, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(salt_kernels, CUDA, m) {
  m.impl("salt_forward", &salt_forward_cuda);
  m.impl("salt_backward", &salt_backward_cuda);
}

}  // namespace salt_kernels
