// The CUDA kernels of the enat:: operator library: one schema per kernel this library implements
// (csrc/cuda/*.cu register the CUDA implementations). The public ops of enat_kernels.ops, their fake
// kernels, autograd formulas and backend choice are defined once, in Python (enat_kernels/ops); the
// "cuda" backend there calls these kernels, and C++ programs can call them directly
// (csrc/enat_kernels.h) or through the dispatcher as enat::<name>.
#include <torch/library.h>

#ifdef ENAT_KERNELS_PYTHON_MODULE
#include <Python.h>

// `import enat_kernels._C` loads this library, which runs the registrations below. The module's
// init function is the only symbol the Python module exports (built with hidden visibility).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY_FRAGMENT(enat, m) {
  m.def("asymmetric_attention_cuda(Tensor q, Tensor k_ctx, Tensor v_ctx, Tensor k_self, Tensor v_self, "
        "float scale) -> (Tensor, Tensor)");
  m.def("gather_tokens_cuda(Tensor x, Tensor index) -> Tensor");
  m.def("mask_to_index_cuda(Tensor mask, SymInt count) -> Tensor");
  m.def("scatter_tokens_cuda(Tensor base, Tensor index, Tensor src) -> Tensor");
  m.def("scatter_tokens_inplace_cuda(Tensor(a!) base, Tensor index, Tensor src) -> ()");
  m.def("scatter_into_zeros_cuda(Tensor index, Tensor src, SymInt L) -> Tensor");
  m.def("zero_rows_cuda(Tensor x, Tensor index) -> Tensor");
  m.def("split_tokens_cuda(Tensor x, Tensor mask, SymInt n_masked) -> (Tensor, Tensor)");
  m.def("restore_tokens_cuda(Tensor visible, Tensor masked, Tensor mask) -> Tensor");
  m.def("merge_cache_cuda(Tensor fresh, Tensor fresh_index, Tensor cached, Tensor cached_index) -> Tensor");
  m.def("merge_cache_backward_cuda(Tensor grad, Tensor fresh_index, Tensor cached_index) -> (Tensor, Tensor)");
}
