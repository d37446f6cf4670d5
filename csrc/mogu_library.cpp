// mogu_library.cpp: the ``mogu_C`` torch library (schemas, CPU registrations) and the Python
// module ``mogu_kernels._C``.
//
// The Python module itself is empty apart from two build flags (WITH_CUDA, WITH_OPENMP);
// importing it runs the static TORCH_LIBRARY registrations of all sources. Where the kernels
// live: argument checks and the forwards' shared entry preamble mogu_entry.cpp, CPU forward
// mogu_cpu.cpp, CUDA forward mogu_cuda.cu, backward (ATen, both devices) mogu_backward.cpp,
// autograd mogu_autograd.cpp, fake (meta) kernels in Python
// (mogu_kernels/extension.py, which set_python_module points the dispatcher at).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/version.h>

#include "mogu_ops.h"

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
