// mogu_library.cpp: the ``mogu_C`` torch library (schemas, CPU registrations), the shared
// argument checks, and the Python module ``mogu_kernels._C``.
//
// The Python module itself is empty apart from two build flags (WITH_CUDA, WITH_OPENMP);
// importing it runs the static TORCH_LIBRARY registrations of all sources. Where the kernels
// live: CPU forward mogu_cpu.cpp, CUDA forward mogu_cuda.cu, backward (ATen, both devices)
// mogu_backward.cpp, autograd mogu_autograd.cpp, fake (meta) kernels in Python
// (mogu_kernels/extension.py, which set_python_module points the dispatcher at).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/version.h>

#include "mogu_ops.h"

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

}  // namespace mogu

TORCH_LIBRARY(mogu_C, m) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  m.set_python_module("mogu_kernels.extension");
#else
  m.impl_abstract_pystub("mogu_kernels.extension");
#endif
  m.def(
      "mogu_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor router_weight, Tensor router_bias, float scaling, Tensor? base_rows) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "mogu_linear_backward(Tensor grad_y, Tensor? grad_gates, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor lora_A, Tensor lora_B, Tensor router_weight, Tensor? base_rows, Tensor saved, "
      "float scaling, ScalarType router_bias_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mogu_C, CPU, m) {
  m.impl("mogu_linear", &mogu::mogu_linear_cpu);
  m.impl("mogu_linear_backward", &mogu::mogu_linear_backward);
}

// The CUDA forward is registered next to its kernels (mogu_cuda.cu); the backward is plain ATen.
#ifdef MOGU_WITH_CUDA
TORCH_LIBRARY_IMPL(mogu_C, CUDA, m) {
  m.impl("mogu_linear_backward", &mogu::mogu_linear_backward);
}
#endif

// ``import mogu_kernels._C``: an otherwise empty module (no pybind11) with the build flags.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mogu_C torch ops (see torch.ops.mogu_C); WITH_CUDA/WITH_OPENMP: build flags",
      -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef MOGU_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
#ifdef MOGU_WITH_OPENMP
  PyModule_AddIntConstant(module, "WITH_OPENMP", 1);
#else
  PyModule_AddIntConstant(module, "WITH_OPENMP", 0);
#endif
  return module;
}
