// mogu_autograd.cpp: the Autograd kernel of mogu_C::mogu_linear.
//
// Registered in C++ (not with torch.library.register_autograd in Python) so that an
// inference call, the common case, costs no Python round trip: with grad mode off or no
// input requiring grad it goes straight to the CPU/CUDA kernel. Otherwise a
// torch::autograd::Function saves x, the frozen weight/bias, the LoRA and router weights
// and the forward's small ``saved`` output (never the M x N base output) and calls
// mogu_C::mogu_linear_backward. Fake kernels for both ops are registered in Python
// (mogu_kernels/extension.py), which is all torch.compile needs on top of this.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "mogu_ops.h"

namespace mogu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor, Tensor> call_forward(const Tensor& x, const Tensor& weight,
                                                const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                const Tensor& lora_B, const Tensor& router_weight,
                                                const Tensor& router_bias, double scaling,
                                                const std::optional<Tensor>& base_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mogu_C::mogu_linear", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, double, const std::optional<Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> call_backward(
    const Tensor& grad_y, const std::optional<Tensor>& grad_gates, const Tensor& x, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B, const Tensor& router_weight,
    const std::optional<Tensor>& base_rows, const Tensor& saved, double scaling, at::ScalarType router_bias_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mogu_C::mogu_linear_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                           const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
                           const std::optional<Tensor>&, const Tensor&, double, at::ScalarType)>();
  return op.call(grad_y, grad_gates, x, weight, bias, lora_A, lora_B, router_weight, base_rows, saved, scaling,
                 router_bias_dtype);
}

std::optional<Tensor> optional_of(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

class MoguLinearFunction : public torch::autograd::Function<MoguLinearFunction> {
 public:
  // Arguments in schema order; returns {y, gates, saved}.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B,
                               const Tensor& router_weight, const Tensor& router_bias, double scaling,
                               const std::optional<Tensor>& base_rows) {
    auto [y, gates, saved] =
        call_forward(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows);
    ctx->save_for_backward({x, weight, bias.value_or(Tensor()), lora_A, lora_B, router_weight,
                            base_rows.value_or(Tensor()), saved});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["router_bias_dtype"] = static_cast<int64_t>(router_bias.scalar_type());
    ctx->mark_non_differentiable({saved});
    return {y, gates, saved};
  }

  // grads: {d y, d gates, d saved (always undefined)}; returns one entry per forward argument
  // (undefined for the frozen weight/bias, the non-tensors and base_rows).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &weight = s[1], &bias = s[2], &lora_A = s[3], &lora_B = s[4], &router_weight = s[5],
                 &base_rows = s[6], &saved = s[7];
    Tensor grad_y = grads[0];
    if (!grad_y.defined()) {  // only the gates were used downstream
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
      shape.push_back(weight.size(0));
      grad_y = at::zeros(shape, x.options());
    }
    auto [dx, dA, dB, drw, drb] =
        call_backward(grad_y, optional_of(grads[1]), x, weight, optional_of(bias), lora_A, lora_B, router_weight,
                      optional_of(base_rows), saved, ctx->saved_data["scaling"].toDouble(),
                      static_cast<at::ScalarType>(ctx->saved_data["router_bias_dtype"].toInt()));
    // needs_input_grad counts only the tensor arguments that were passed (edges): x, weight,
    // then bias if given, then lora_A, lora_B, router_weight, router_bias.
    const size_t after_bias = bias.defined() ? 3 : 2;
    auto keep = [&](size_t edge, const Tensor& g) { return ctx->needs_input_grad(edge) ? g : Tensor(); };
    return {keep(0, dx),  Tensor(), Tensor(), keep(after_bias, dA), keep(after_bias + 1, dB),
            keep(after_bias + 2, drw), keep(after_bias + 3, drb), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> mogu_linear_autograd(const Tensor& x, const Tensor& weight,
                                                        const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                        const Tensor& lora_B, const Tensor& router_weight,
                                                        const Tensor& router_bias, double scaling,
                                                        const std::optional<Tensor>& base_rows) {
  const bool needs_graph = at::GradMode::is_enabled() &&
                           (x.requires_grad() || lora_A.requires_grad() || lora_B.requires_grad() ||
                            router_weight.requires_grad() || router_bias.requires_grad());
  if (!needs_graph) {
    return call_forward(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows);
  }
  auto out = MoguLinearFunction::apply(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling,
                                       base_rows);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace mogu

TORCH_LIBRARY_IMPL(mogu_C, Autograd, m) {
  m.impl("mogu_linear", &mogu::mogu_linear_autograd);
}
