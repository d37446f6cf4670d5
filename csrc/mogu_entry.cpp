// mogu_entry.cpp: the argument checks of both ops (check_args, declared in mogu_ops.h) and
// the entry preamble shared by the CPU and CUDA forwards (prepare_forward, mogu_entry.h).
#include "mogu_entry.h"

#include <ATen/ATen.h>

#include <vector>

namespace mogu {

MoguDims check_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                    const Tensor& lora_A, const Tensor& lora_B, const Tensor& router_weight,
                    const std::optional<Tensor>& router_bias, const std::optional<Tensor>& base_rows,
                    const char* where) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, where, ": x must be (..., K) with K > 0, got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, where,
              ": x must be fp32, fp16, bf16 or fp64, got ", dt);
  MoguDims d{};
  d.K = x.size(-1);
  d.M = x.numel() / d.K;
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d.K, where, ": weight must be (N, K=", d.K, "), got ",
              weight.sizes());
  d.N = weight.size(0);
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(2) == d.K && lora_A.size(0) > 0 && lora_A.size(1) > 0, where,
              ": lora_A must be (E, r, K=", d.K, ") with E, r > 0, got ", lora_A.sizes());
  d.E = lora_A.size(0);
  d.R = lora_A.size(1);
  d.ER = d.E * d.R;
  TORCH_CHECK(lora_B.dim() == 3 && lora_B.size(0) == d.E && lora_B.size(1) == d.N && lora_B.size(2) == d.R,
              where, ": lora_B must be (E=", d.E, ", N=", d.N, ", r=", d.R, "), got ", lora_B.sizes());
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.size(0) == d.E && router_weight.size(1) == d.K, where,
              ": router_weight must be (E=", d.E, ", K=", d.K, "), got ", router_weight.sizes());
  TORCH_CHECK(at::isFloatingType(router_weight.scalar_type()), where, ": router_weight must be floating point");
  std::vector<const Tensor*> on_device = {&weight, &lora_A, &lora_B, &router_weight};
  if (router_bias.has_value()) {
    TORCH_CHECK(router_bias->dim() == 1 && router_bias->size(0) == d.E, where, ": router_bias must be (E=", d.E,
                ",), got ", router_bias->sizes());
    TORCH_CHECK(at::isFloatingType(router_bias->scalar_type()), where, ": router_bias must be floating point");
    on_device.push_back(&*router_bias);
  }
  for (const Tensor* t : {&weight, &lora_A, &lora_B}) {
    TORCH_CHECK(t->scalar_type() == dt, where, ": weight, lora_A and lora_B must have x's dtype ", dt,
                ", got ", t->scalar_type());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d.N, where, ": bias must be (N=", d.N, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dt, where, ": bias must have x's dtype ", dt, ", got ",
                bias->scalar_type());
    on_device.push_back(&*bias);
  }
  if (base_rows.has_value()) {
    TORCH_CHECK(base_rows->scalar_type() == at::kBool, where, ": base_rows must be bool, got ",
                base_rows->scalar_type());
    TORCH_CHECK(base_rows->sizes() == x.sizes().slice(0, x.dim() - 1), where,
                ": base_rows must have shape x.shape[:-1]=", x.sizes().slice(0, x.dim() - 1), ", got ",
                base_rows->sizes());
    on_device.push_back(&*base_rows);
  }
  for (const Tensor* t : on_device) {
    TORCH_CHECK(t->device() == x.device(), where, ": all tensors must be on x's device ", x.device(),
                ", got one on ", t->device());
  }
  return d;
}


Tensor dense(const Tensor& t, at::ScalarType dtype) {
  return (t.scalar_type() == dtype && t.is_contiguous()) ? t : t.to(dtype).contiguous();
}

ForwardCall prepare_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                            const Tensor& lora_A, const Tensor& lora_B, const Tensor& router_weight,
                            const Tensor& router_bias, const std::optional<Tensor>& base_rows,
                            c10::DeviceType device, const char* where) {
  ForwardCall f;
  f.d = check_args(x, weight, bias, lora_A, lora_B, router_weight, router_bias, base_rows, where);
  TORCH_CHECK(x.device().type() == device, where, ": x must be a ", device, " tensor, got one on ", x.device());
  const MoguDims& d = f.d;
  const auto dt = x.scalar_type();
  f.acc = acc_dtype(dt);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  f.lead.assign(lead.begin(), lead.end());

  f.y = at::empty({d.M, d.N}, x.options());
  f.gates = at::empty({d.M, d.E}, x.options());
  f.saved = at::empty({d.M, d.ER + d.E}, x.options().dtype(f.acc));
  if (d.M == 0) return f;

  f.x2 = x.dim() == 2 ? x : x.reshape({d.M, d.K});  // no new tensor object for the common 2-D x
  if (f.x2.stride(1) != 1) f.x2 = f.x2.contiguous();  // rows may be strided, K must be unit-stride
  f.A = dense(lora_A, dt);
  f.B = dense(lora_B, dt);
  f.v = dense(router_weight, f.acc);
  f.c = dense(router_bias, f.acc);
  if (bias.has_value()) f.bias = dense(*bias, dt);
  if (base_rows.has_value()) f.base_rows = dense(*base_rows, at::kBool);
  return f;
}

std::tuple<Tensor, Tensor, Tensor> ForwardCall::outputs() const {
  if (lead.size() == 1) return {y, gates, saved};  // 2-D x: already shaped
  auto with_last = [&](int64_t last) {
    std::vector<int64_t> shape(lead);
    shape.push_back(last);
    return shape;
  };
  return {y.view(with_last(d.N)), gates.view(with_last(d.E)), saved.view(with_last(d.ER + d.E))};
}

}  // namespace mogu
