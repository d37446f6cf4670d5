// mogu_entry.h: the entry preamble shared by the CPU (mogu_cpu.cpp) and CUDA (mogu_cuda.cu)
// forwards of mogu_C::mogu_linear, so that the two entries differ only in their kernels.
//
//   ForwardCall f = prepare_forward(..., c10::DeviceType::CPU, "mogu_linear[cpu]");
//   if (f.d.M > 0) {
//     MOGU_DISPATCH_FLOATING(f.x2.scalar_type(), "mogu_linear_cpu", [&] { ... scalar_t, acc_t ... });
//   }
//   return f.outputs();
//
// prepare_forward runs check_args (shapes, dtypes, devices: contract in mogu_ops.h) plus the
// device-type check, allocates the three outputs, and lays the operands
// out the way both kernels read them. MOGU_DISPATCH_FLOATING is the one dtype dispatch: the
// dtypes check_args accepts, with scalar_t = x's element type and acc_t = the accumulation
// type (at::opmath_type: fp32 for fp16/bf16/fp32, fp64 for fp64, i.e. acc_dtype).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>
#include <vector>

#include "mogu_ops.h"

namespace mogu {

// One validated forward call, laid out for the kernels.
struct ForwardCall {
  MoguDims d;
  at::ScalarType acc;  // acc_dtype(x): gate math, saved, logits

  // Outputs, 2-D (outputs() restores x's leading dimensions).
  Tensor y;      // (M, N) x.dtype
  Tensor gates;  // (M, E) x.dtype
  Tensor saved;  // (M, Er + E) acc: unscaled shrink | gates

  // Operands; defined only when M > 0 (an empty call has nothing to compute).
  Tensor x2;         // (M, K) view of x, unit stride in K (a copy only when x's K stride is not 1)
  Tensor A;          // lora_A (E, r, K) contiguous, read as the stacked (Er, K)
  Tensor B;          // lora_B (E, N, r) contiguous
  Tensor v;          // router_weight (E, K) contiguous in acc
  Tensor c;          // router_bias (E,) contiguous in acc
  Tensor bias;       // (N,) contiguous, or undefined
  Tensor base_rows;  // bool, contiguous, read as (M,), or undefined

  std::vector<int64_t> lead;  // x.shape[:-1]

  // (y, gates, saved) shaped (..., N), (..., E), (..., Er + E).
  std::tuple<Tensor, Tensor, Tensor> outputs() const;
};

// The shared preamble: check_args (``where`` names the op in messages), x on a ``device``
// device, outputs allocated with x's options, operands as documented in ForwardCall.
ForwardCall prepare_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                            const Tensor& lora_A, const Tensor& lora_B, const Tensor& router_weight,
                            const Tensor& router_bias, const std::optional<Tensor>& base_rows,
                            c10::DeviceType device, const char* where);

// t itself when it is already contiguous in dtype (no dispatcher round trip: decode calls are
// short enough for that to matter), else a contiguous copy in dtype.
Tensor dense(const Tensor& t, at::ScalarType dtype);

}  // namespace mogu

// AT_DISPATCH over the op's dtypes (fp32, fp64, fp16, bf16); the body (a lambda, called with
// no arguments) sees scalar_t and acc_t. NAME must be a string literal (ATen's requirement).
#define MOGU_DISPATCH_FLOATING(TYPE, NAME, ...)                                \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, [&] { \
    using acc_t = at::opmath_type<scalar_t>;                                   \
    __VA_ARGS__();                                                             \
  })
