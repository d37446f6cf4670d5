// mogu_backward.cpp: mogu_C::mogu_linear_backward (contract in mogu_ops.h).
//
// Written once with ATen ops, so the same code runs on CPU (MKL / oneDNN GEMMs) and CUDA
// (cuBLAS): backward is a handful of GEMMs plus small gate-shaped elementwise work, which
// custom kernels would not speed up meaningfully.
#include <ATen/ATen.h>

#include "mogu_ops.h"

namespace mogu {

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mogu_linear_backward(
    const Tensor& grad_y, const std::optional<Tensor>& grad_gates, const Tensor& x, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B, const Tensor& router_weight,
    const std::optional<Tensor>& base_rows, const Tensor& saved, double scaling,
    at::ScalarType router_bias_dtype) {
  // Notation: dy (M, N); z = saved[:, :Er] viewed (M, E, r); g = saved[:, Er:] (M, E); mix = g
  // with base rows zeroed; gs = sum_e mix (1 on base rows); S = [A_0; ..; A_{E-1}; v] (Er+E, K).
  //   dyW   = dy W                                   (M, K)  the one large GEMM
  //   dmix  = (dyW . x + dy . b) + s (dy B_e) . z_e  (M, E)  d loss / d mix_e; 0 on base rows
  //   dlog  = (dmix + grad_gates) g (1 - g)          (M, E)
  //   dz    = s mix_e (dy B_e)                       (M, Er)
  //   dx    = gs dyW + [dz | dlog] S;   dA = dz^T x;   dB_e = dy^T (s mix_e z_e)
  //   dv    = dlog^T x;   dc = sum over rows of dlog
  // GEMMs on dy run in x's dtype (BLAS / cuBLAS accumulate in fp32); everything gate-shaped and
  // the small products that produce router/LoRA-A/x gradients run in acc (fp32 or fp64).
  const MoguDims d = check_args(x, weight, bias, lora_A, lora_B, router_weight, std::nullopt, base_rows,
                                "mogu_linear_backward");
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t M = d.M, K = d.K, N = d.N, E = d.E, R = d.R, ER = d.ER;
  TORCH_CHECK(grad_y.numel() == M * N, "mogu_linear_backward: grad_y must have shape (..., N=", N, ")");
  TORCH_CHECK(saved.scalar_type() == acc && saved.numel() == M * (ER + E),
              "mogu_linear_backward: saved must be (..., Er+E) in ", acc);

  const Tensor x2 = x.reshape({M, K});
  const Tensor dy = grad_y.reshape({M, N}).to(x.scalar_type());
  const Tensor sv = saved.reshape({M, ER + E});
  const Tensor z = sv.narrow(1, 0, ER).reshape({M, E, R});
  const Tensor g = sv.narrow(1, ER, E);

  Tensor mix = g, gate_sum, keep;
  if (base_rows.has_value()) {
    keep = base_rows->reshape({M, 1}).logical_not().to(acc);  // 1 on MoGU rows, 0 on base rows
    mix = g * keep;
    gate_sum = mix.sum(-1, /*keepdim=*/true) + (1 - keep);
  } else {
    gate_sum = g.sum(-1, /*keepdim=*/true);
  }

  const Tensor dyW = at::mm(dy, weight).to(acc);                                    // (M, K)
  const Tensor B_stacked = lora_B.permute({1, 0, 2}).reshape({N, ER});             // (N, Er) [B_0|..]
  const Tensor dyB = at::mm(dy, B_stacked).to(acc).view({M, E, R});                 // (M, E, r)
  const Tensor xa = x2.to(acc);

  Tensor dot_base = (dyW * xa).sum(-1);                                             // dy . x W^T
  if (bias.has_value()) dot_base = dot_base + at::mv(dy, *bias).to(acc);           // + dy . b
  Tensor dmix = dot_base.unsqueeze(-1) + scaling * (dyB * z).sum(-1);               // (M, E)
  if (keep.defined()) dmix = dmix * keep;                                           // mix is 0 there
  Tensor dgates = dmix;
  if (grad_gates.has_value()) dgates = dgates + grad_gates->reshape({M, E}).to(acc);
  const Tensor dlogit = dgates * g * (1 - g);                                        // (M, E)

  const Tensor dz = (scaling * mix.unsqueeze(-1) * dyB).reshape({M, ER});           // (M, Er)
  const Tensor S = at::cat({lora_A.reshape({ER, K}).to(acc), router_weight.to(acc)}, 0);
  const Tensor dx = at::addmm(dyW * gate_sum, at::cat({dz, dlogit}, 1), S)
                        .to(x.scalar_type()).reshape(x.sizes());
  const Tensor dA = at::mm(dz.t(), xa).to(lora_A.scalar_type()).reshape({E, R, K});
  const Tensor scaled_z = (scaling * mix.unsqueeze(-1) * z).reshape({M, ER}).to(x.scalar_type());
  const Tensor dB = at::mm(dy.t(), scaled_z).view({N, E, R}).permute({1, 0, 2}).contiguous();
  const Tensor drw = at::mm(dlogit.t(), xa).to(router_weight.scalar_type());
  const Tensor drb = dlogit.sum(0).to(router_bias_dtype);
  return {dx, dA, dB, drw, drb};
}

}  // namespace mogu
