// The CUDA side of device.h: what CUDA does differently from the CPU under the shared
// algorithm of ../salt_linear.cpp. Everything runs on the current stream of the current
// device (the shared code guards on the inputs' device).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include "../device.h"
#include "salt_device.cuh"

namespace salt_kernels {
namespace {

using at::Tensor;

// at:: scalar types -> the CUDA types the device code uses (same bit layout).
template <typename T> struct DeviceType { using type = T; };
template <> struct DeviceType<at::Half> { using type = __half; };
template <> struct DeviceType<at::BFloat16> { using type = __nv_bfloat16; };

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "salt_kernels CUDA launch failed: ", cudaGetErrorString(err)); }

}  // namespace

// Half-precision GEMMs on tensor cores in the input dtype; fp32 stays fp32 (TF32 only if
// the user allowed it for matmuls), fp64 fp64.
at::ScalarType CudaDevice::gemm_dtype(at::ScalarType input, at::ScalarType acc) {
  return (input == at::kHalf || input == at::kBFloat16) && acc == at::kFloat ? input : acc;
}

// cuBLAS writes the fp32 accumulator straight into the fp32 output (aten::mm.dtype_out):
// Z and dT keep full precision.
void CudaDevice::mm_widening_out(Tensor& out, const Tensor& a, const Tensor& b) {
  at::mm_out(out, a, b, out.scalar_type());
}

Tensor CudaDevice::empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

// A custom kernel, not at::sum: ATen's reduction order follows its launch configuration
// (and the SM count); this one is fixed by M alone (salt_device.cuh).
void CudaDevice::add_column_sums(const Tensor& G, Tensor& col_sums) {
  const int64_t M = G.size(0), N = G.size(1);
  const int64_t chunks = salt_cuda::reduction_chunks(M);
  Tensor partials = at::empty({chunks, N}, col_sums.options());
  Tensor sums = at::empty({N}, col_sums.options());
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "salt_column_sums_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;  // fp32, fp64 for fp64
    TORCH_CHECK(col_sums.scalar_type() == c10::CppTypeToScalarType<Acc>::value,
                "salt_kernels: column sums accumulate in float32 (float64 for float64 G)");
    check(salt_cuda::launch_column_sum_partials<T, Acc>(reinterpret_cast<const T*>(G.const_data_ptr()), M, N,
          G.stride(0), G.stride(1), chunks, partials.mutable_data_ptr<Acc>(), stream));
    check(salt_cuda::launch_sum_partials<Acc, Acc>(partials.const_data_ptr<Acc>(), chunks, N,
          sums.mutable_data_ptr<Acc>(), stream));
  });
  col_sums.add_(sums);
}

// In order on the stream: each cuBLAS call fills the GPU by itself.
void CudaDevice::for_each_slice(int64_t n, const std::function<void(int64_t)>& body) {
  for (int64_t s = 0; s < n; ++s) body(s);
}

// One cuBLAS batched GEMM (strided batch): each product's reduction is cuBLAS's, fixed for
// one shape, GPU model and library version.
void CudaDevice::bmm_out(Tensor& out, const Tensor& a, const Tensor& b) { at::bmm_out(out, a, b); }

// One launch instead of n - 1 adds; same order as the CPU twin.
void CudaDevice::sum_slices(const Tensor& parts, Tensor& out) {
  TORCH_CHECK(parts.is_contiguous() && out.is_contiguous(), "salt_kernels: sum_slices expects contiguous buffers");
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "salt_sum_slices_cuda", [&] {
    check(salt_cuda::launch_sum_partials<scalar_t, scalar_t>(parts.const_data_ptr<scalar_t>(), parts.size(0),
          out.numel(), out.mutable_data_ptr<scalar_t>(), stream));
  });
}

// The formula of mix_rows.h, a warp per row (salt_device.cuh).
void CudaDevice::mix_rows(const Tensor& Z, const Tensor& index, const Tensor& sigma, const Tensor& P,
                          const Tensor& Q, const Tensor& base_sigma, double scaling, Tensor& out) {
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "salt_mix_rows_cuda", [&] {
    check(salt_cuda::launch_mix_rows<scalar_t>(
        Z.const_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(), sigma.const_data_ptr<scalar_t>(),
        P.const_data_ptr<scalar_t>(), Q.const_data_ptr<scalar_t>(),
        base_sigma.defined() ? base_sigma.const_data_ptr<scalar_t>() : nullptr, Z.size(0), Z.size(1), P.size(1),
        static_cast<scalar_t>(scaling), out.mutable_data_ptr<scalar_t>(), stream));
  });
}

}  // namespace salt_kernels
