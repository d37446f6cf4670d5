// mogu_ops.h: the C++ side of the ``mogu_C`` torch library (extension ``mogu_kernels._C``).
//
// Op contract (docs/design.md section 2; E experts of rank r, Er = E * r):
//
//   mogu_C::mogu_linear(x, weight, bias?, lora_A, lora_B, router_weight, router_bias,
//                       scaling, base_rows?) -> (y, gates, saved)
//     x (..., K)  weight (N, K)  bias (N,) or None  lora_A (E, r, K)  lora_B (E, N, r)
//     router_weight (E, K)  router_bias (E,)  base_rows: None or bool (...) = x.shape[:-1]
//     x, weight, bias, lora_A, lora_B share one dtype (fp32, fp16, bf16 or fp64); the router
//     tensors may be any floating dtype. With acc = fp32 (fp64 for fp64 x):
//       g     = sigmoid(x v^T + c)                      in acc            (..., E)
//       mix   = g, or 0 on a base row;  gs = sum_e mix, or 1 on a base row
//       y     = gs * (x W^T + b) + sum_e s * mix_e * (x A_e^T) B_e^T        (..., N) x.dtype
//       gates = g                                                           (..., E) x.dtype
//       saved = [x A_0^T, ..., x A_{E-1}^T | g]   unscaled shrink and gates (..., Er+E) acc
//     ``saved`` is what backward needs per token (not differentiable). A base row is the
//     plain base layer: y = x W^T + b exactly as far as the arithmetic allows; its gates
//     are still reported.
//
//   mogu_C::mogu_linear_backward(grad_y, grad_gates?, x, weight, bias?, lora_A, lora_B,
//                                router_weight, base_rows?, saved, scaling,
//                                router_bias_dtype) -> (dx, dlora_A, dlora_B, drouter_weight,
//                                                      drouter_bias)
//     Gradients of the five differentiable inputs (weight and bias are frozen), in the
//     dtypes of x, lora_A, lora_B, router_weight and router_bias_dtype. The one large product
//     is dy W (M x N x K), which dx and the router gradients need (the latter through
//     dy . (x W^T + b) = (dy W) . x + dy . b, so the M x N base output is never saved); the
//     rest costs O(M (N + K) E r). All five are always computed (the autograd kernel drops the
//     ones nobody asked for): simpler than an output mask, and only a call whose x and
//     routers both need no gradient pays for an unneeded dy W.
//
// Both ops have CPU and (when built with MOGU_WITH_CUDA) CUDA kernels. The Autograd kernel of
// mogu_linear is C++ (mogu_autograd.cpp); the fake (meta) kernels of both ops are registered
// from Python (mogu_kernels/extension.py). Optional tensors (bias, base_rows, grad_gates) are
// plain ``Tensor?`` schema arguments: pass None, never an empty placeholder tensor.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace mogu {

using at::Tensor;

// Problem sizes of one call, read off validated arguments.
struct MoguDims {
  int64_t M;   // rows of x (product of the leading dimensions)
  int64_t K;   // input features
  int64_t N;   // output features
  int64_t E;   // experts
  int64_t R;   // LoRA rank
  int64_t ER;  // E * R, width of the stacked shrink
};

// TORCH_CHECKs the op's arguments (shapes, dtypes, devices) so that the kernels may index
// raw pointers safely even when the op is called directly through torch.ops, and returns the
// sizes. router_bias is None for the backward (which only needs its dtype). ``where`` names
// the kernel in error messages. Defined in mogu_entry.cpp; the forwards reach it through
// prepare_forward (mogu_entry.h), their shared entry preamble.
MoguDims check_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                    const Tensor& lora_A, const Tensor& lora_B, const Tensor& router_weight,
                    const std::optional<Tensor>& router_bias, const std::optional<Tensor>& base_rows,
                    const char* where);

// The dtype of the gate math and of ``saved``: fp64 for fp64 x, fp32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<Tensor, Tensor, Tensor> mogu_linear_cpu(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& router_weight, const Tensor& router_bias, double scaling,
    const std::optional<Tensor>& base_rows);

// The path this process's CPU bf16 forward takes (for an even K; odd K always takes the
// generic kernels), read from the CPU once and capped by MOGU_CPU_BF16_PATH:
// "brgemm+avx512bf16" (oneDNN's bf16 brgemm, which torch offers where the CPU has AMX, plus
// the AVX512-BF16 kernels), "brgemm" (brgemm only), or "generic" (the kernels every CPU runs).
const char* cpu_bf16_path();

#ifdef MOGU_WITH_CUDA
std::tuple<Tensor, Tensor, Tensor> mogu_linear_cuda(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& router_weight, const Tensor& router_bias, double scaling,
    const std::optional<Tensor>& base_rows);
#endif

// Device-agnostic (ATen ops only: MKL/oneDNN on CPU, cuBLAS on CUDA); registered for both.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mogu_linear_backward(
    const Tensor& grad_y, const std::optional<Tensor>& grad_gates, const Tensor& x, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B, const Tensor& router_weight,
    const std::optional<Tensor>& base_rows, const Tensor& saved, double scaling,
    at::ScalarType router_bias_dtype);

}  // namespace mogu
