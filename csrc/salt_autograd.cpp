// Autograd of salt_kernels::salt_forward in C++ (the contract and chain rule of
// salt_kernels/backends/autograd.py, which the Triton ops register from Python). In C++
// because the Python wrapper torch.library builds costs more per call than a decode-size
// layer's GEMMs on CPU; this one costs a few microseconds.
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

namespace salt_kernels {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor> call_forward(const Tensor& x, const Tensor& U, const Tensor& V, const Tensor& C,
                                        const std::optional<Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("salt_kernels::salt_forward", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&, const std::optional<Tensor>&)>();
  return op.call(x, U, V, C, bias);
}

std::tuple<Tensor, Tensor, Tensor> call_backward(const Tensor& G, const Tensor& Z, const Tensor& U, const Tensor& V,
                                                 const Tensor& C, bool need_dx, bool need_dC, bool need_db) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("salt_kernels::salt_backward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                       const Tensor&, const Tensor&, bool, bool, bool)>();
  return op.call(G, Z, U, V, C, need_dx, need_dC, need_db);
}

class SaltFunction : public torch::autograd::Function<SaltFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& U, const Tensor& V,
                               const Tensor& C, const std::optional<Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, Z] = call_forward(x, U, V, C, bias);
    // x is saved only if dV is needed: otherwise Z (M x r) is all the backward reads.
    ctx->save_for_backward({Z, U, V, C, V.requires_grad() ? x : Tensor()});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({Z});  // an internal output salt_linear never returns
    return {y, Z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The forward ran with autocast off (salt_linear casts first): nothing here may be
    // re-cast by an autocast block the backward is called in.
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const Tensor &Z = saved[0], &U = saved[1], &V = saved[2], &C = saved[3], &x = saved[4];
    const Tensor& G = grads[0];
    const bool need_x = ctx->needs_input_grad(0), need_U = ctx->needs_input_grad(1),
               need_V = ctx->needs_input_grad(2), need_C = ctx->needs_input_grad(3),
               need_b = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(4);
    auto [dx, dC, db] = call_backward(G, Z, U, V, C, need_x, need_C, need_b);
    Tensor dU, dV;
    if (need_U || need_V) {  // the frozen basis: rare, plain ATen ops in C's dtype
      const Tensor G_acc = G.to(C.scalar_type());
      if (need_U) dU = at::mm(G_acc.t(), at::mm(Z, C.t())).to(U.scalar_type());                       // G^T T
      if (need_V) dV = at::mm(x.to(C.scalar_type()).t(), at::mm(at::mm(G_acc, U.to(C.scalar_type())), C))
                           .to(V.scalar_type());                                                        // x^T dZ
    }
    return {need_x ? dx : Tensor(), dU, dV, need_C ? dC : Tensor(), need_b ? db : Tensor()};
  }
};

std::tuple<Tensor, Tensor> salt_forward_autograd(const Tensor& x, const Tensor& U, const Tensor& V, const Tensor& C,
                                                 const std::optional<Tensor>& bias) {
  auto out = SaltFunction::apply(x, U, V, C, bias);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(salt_kernels, Autograd, m) { m.impl("salt_forward", &salt_forward_autograd); }

}  // namespace salt_kernels
