// The salt_kernels op schemas, defined once; each device registers its kernels in its
// own file (cpu/salt_cpu.cpp, cuda/salt_cuda.cu). Contract: salt_kernels/backends/autograd.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(salt_kernels, m) {
  // y = (x @ V) @ C^T @ U^T + bias, and Z = x @ V (saved for backward, in C's dtype).
  m.def("salt_forward(Tensor x, Tensor U, Tensor V, Tensor C, Tensor? bias) -> (Tensor, Tensor)");
  // dT = G @ U; dC = dT^T Z; dx = dT @ C @ V^T; db = sum_rows G. Unrequested outputs are empty.
  m.def(
      "salt_backward(Tensor G, Tensor Z, Tensor U, Tensor V, Tensor C, bool need_dx, bool need_dC, "
      "bool need_db) -> (Tensor, Tensor, Tensor)");
  // The dtype the CPU kernels run their large GEMMs in for inputs of `dtype` (a query:
  // bf16 runs as bf16 GEMMs only on CPUs with bf16 dot-product instructions).
  m.def("cpu_gemm_dtype(ScalarType dtype) -> ScalarType");
}

// `import salt_kernels._C` loads this library, which runs the registrations above; the
// Python module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
