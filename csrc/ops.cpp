// The enat:: operator library: one schema per op.
//
// Public ops (the contract of enat_kernels.ops) take a trailing `backend` argument: "reference",
// "triton" or "cuda", resolved by the Python dispatcher before the call. Their kernels, fake kernels
// and autograd formulas are registered from Python (enat_kernels/ops). The `*_cuda` ops are the CUDA
// kernels themselves (csrc/cuda), which the "cuda" backend calls and C++ users can call directly.
//
// enat_kernels/_library.py keeps the same public schemas for builds without this extension;
// tests/test_library.py checks that both lists agree.
#include <torch/library.h>

#ifdef ENAT_KERNELS_PYTHON_MODULE
#include <Python.h>

// `import enat_kernels._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(enat, m) {
  // 1. Asymmetric attention: queries over [context ; self] keys. Returns (out, lse).
  m.def("asymmetric_attention(Tensor q, Tensor k_ctx, Tensor v_ctx, Tensor k_self, Tensor v_self, "
        "float scale, str backend) -> (Tensor, Tensor)");
  m.def("asymmetric_attention_backward(Tensor grad_out, Tensor q, Tensor k_ctx, Tensor v_ctx, "
        "Tensor k_self, Tensor v_self, Tensor out, Tensor lse, float scale, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // 2. Critical-token movement.
  m.def("mask_to_index(Tensor mask, SymInt count, str backend) -> Tensor");
  m.def("gather_tokens(Tensor x, Tensor index, str backend) -> Tensor");
  m.def("scatter_tokens(Tensor base, Tensor index, Tensor src, str backend) -> Tensor");
  m.def("scatter_tokens_(Tensor(a!) base, Tensor index, Tensor src, str backend) -> ()");
  m.def("split_tokens(Tensor x, Tensor mask, SymInt n_masked, str backend) -> (Tensor, Tensor)");
  m.def("restore_tokens(Tensor visible, Tensor masked, Tensor mask, str backend) -> Tensor");
  m.def("merge_cache(Tensor fresh, Tensor fresh_index, Tensor cached, Tensor cached_index, "
        "str backend) -> Tensor");
  // Backward-only ops, one launch each.
  m.def("scatter_into_zeros(Tensor index, Tensor src, SymInt L, str backend) -> Tensor");
  m.def("zero_rows(Tensor x, Tensor index, str backend) -> Tensor");
  m.def("merge_cache_backward(Tensor grad, Tensor fresh_index, Tensor cached_index, str backend) "
        "-> (Tensor, Tensor)");

  // CUDA kernels (csrc/cuda/*.cu).
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
