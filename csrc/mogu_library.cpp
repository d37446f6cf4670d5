// mogu_library.cpp: the ``mogu_C`` torch library (schemas, CPU registrations) and the Python
// module ``mogu_kernels._C``.
//
// The Python module holds two build flags (WITH_CUDA, WITH_OPENMP), ``mogu_linear``, the
// op's fast entry for mogu_kernels.extension, and ``cpu_bf16_path`` (which bf16 path this
// CPU takes, for tests and benchmarks); importing it runs the static TORCH_LIBRARY
// registrations of all sources. Where the kernels
// live: argument checks and the forwards' shared entry preamble mogu_entry.cpp, CPU forward
// mogu_cpu.cpp, CUDA forward mogu_cuda.cu, backward (ATen, both devices) mogu_backward.cpp,
// autograd mogu_autograd.cpp, fake (meta) kernels in Python
// (mogu_kernels/extension.py, which set_python_module points the dispatcher at).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
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

namespace {

// torch.nn.Parameter, looked up on first use (a Tensor subclass whose __torch_function__ is
// disabled, so it needs no Python-level handling).
PyTypeObject* parameter_type() {
  static PyTypeObject* type = [] {
    PyObject* module = PyImport_ImportModule("torch.nn.parameter");
    PyObject* cls = module != nullptr ? PyObject_GetAttrString(module, "Parameter") : nullptr;
    Py_XDECREF(module);
    PyErr_Clear();
    return reinterpret_cast<PyTypeObject*>(cls);  // kept alive for the process
  }();
  return type;
}

// A plain tensor: exactly torch.Tensor or torch.nn.Parameter (no subclass that may override
// __torch_function__).
bool plain_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) || (parameter_type() != nullptr && Py_TYPE(obj) == parameter_type());
}

struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// _C.mogu_linear(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows)
// -> (y, gates): mogu_C::mogu_linear called straight through the dispatcher (autograd, fake
// and device kernels as through torch.ops), without torch.ops' boxed, schema-driven argument
// handling, which costs more than the op itself at decode shapes. Takes the arguments
// positionally as the schema has them; returns NotImplemented (the caller then goes through
// torch.ops) for anything but plain tensors / None and an exact Python float, or while a
// __torch_function__ mode is active, so those keep torch.ops' semantics. Argument errors are
// the op's own (RuntimeError from its TORCH_CHECKs).
PyObject* fast_mogu_linear(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9 || !PyFloat_CheckExact(args[7]) || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  for (int i : {0, 1, 3, 4, 5, 6}) {
    if (!plain_tensor(args[i])) Py_RETURN_NOTIMPLEMENTED;
  }
  for (int i : {2, 8}) {
    if (args[i] != Py_None && !plain_tensor(args[i])) Py_RETURN_NOTIMPLEMENTED;
  }
  auto optional = [&](int i) {
    return args[i] == Py_None ? std::optional<at::Tensor>() : std::optional<at::Tensor>(THPVariable_Unpack(args[i]));
  };
  const std::optional<at::Tensor> bias = optional(2), base_rows = optional(8);
  const double scaling = PyFloat_AS_DOUBLE(args[7]);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mogu_C::mogu_linear", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                           const std::optional<at::Tensor>&)>();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  {
    ReleaseGil no_gil;
    out = op.call(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]), bias, THPVariable_Unpack(args[3]),
                  THPVariable_Unpack(args[4]), THPVariable_Unpack(args[5]), THPVariable_Unpack(args[6]), scaling,
                  base_rows);
  }
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(std::get<0>(out))));
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(std::get<1>(out))));
  return result;
  END_HANDLE_TH_ERRORS
}

PyObject* cpu_bf16_path(PyObject* /*self*/, PyObject* /*unused*/) {
  return PyUnicode_FromString(mogu::cpu_bf16_path());
}

PyMethodDef methods[] = {
    {"mogu_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_mogu_linear)), METH_FASTCALL,
     "mogu_linear(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows) -> (y, gates) "
     "or NotImplemented: torch.ops.mogu_C.mogu_linear without torch.ops' argument handling"},
    {"cpu_bf16_path", &cpu_bf16_path, METH_NOARGS,
     "cpu_bf16_path() -> str: the path of this process's CPU bf16 forward (even K): 'brgemm+avx512bf16', "
     "'brgemm' or 'generic', by what the CPU has, capped by MOGU_CPU_BF16_PATH"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// ``import mogu_kernels._C``: the build flags, the fast entry ``mogu_linear`` and cpu_bf16_path (no pybind11).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "mogu_C torch ops (see torch.ops.mogu_C); mogu_linear: their fast entry; cpu_bf16_path: the CPU bf16 path; "
      "WITH_CUDA/WITH_OPENMP: build flags",
      -1, methods};
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
