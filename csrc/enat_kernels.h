// C++ API of the enat_kernels CUDA kernels, for libtorch programs that link the library built by
// CMakeLists.txt. The same kernels are reachable through the dispatcher as torch::ops enat::<name>.
#pragma once

#include <torch/types.h>

#include <tuple>

// The library is built with hidden symbol visibility; these functions are its exported C++ API.
#define ENAT_API __attribute__((visibility("default")))

namespace enat {

// Attention of q over [k_ctx ; k_self] without concatenating: q (B, H, Lq, D); k_ctx, v_ctx (B, H, Lc, D);
// k_self, v_self (B, H, Ls, D); same dtype (fp16, bf16, fp32) and device, contiguous last dimension,
// any other strides, 1 <= D <= 128, Lc + Ls > 0. Returns out = softmax(q k^T * scale) v as
// (B, H, Lq, D) in the input dtype, laid out (B, Lq, H, D) (out.transpose(1, 2) is contiguous, ready for
// the output projection), and lse (B, H, Lq) fp32 contiguous, the natural-log log-sum-exp of the scaled
// scores.
ENAT_API std::tuple<at::Tensor, at::Tensor> asymmetric_attention_cuda(const at::Tensor& q, const at::Tensor& k_ctx,
                                                                      const at::Tensor& v_ctx, const at::Tensor& k_self,
                                                                      const at::Tensor& v_self, double scale);

// Rows of x at index: x (B, L, D) with a contiguous last dimension, index (B, n) int64 with
// positions in [0, L), unique within a row. Returns (B, n, D), contiguous. One launch, no host sync;
// positions are not range-checked on the device.
ENAT_API at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index);

// The ops below share these conventions: token tensors (B, rows, D) of any dtype with a contiguous
// last dimension and any other strides; index tensors int64 (B, n), any strides, ascending unique
// positions per row (not checked on the device); mask tensors bool (B, L), any strides. Results are
// new contiguous tensors; each op is one launch (none when the result is empty), with no host sync.

// Positions of the True entries of mask (B, L), ascending: (B, count) int64; slots past a row's
// number of Trues hold L.
ENAT_API at::Tensor mask_to_index_cuda(const at::Tensor& mask, int64_t count);

// base (B, L, D), index (B, n), src (B, n, D) -> (B, L, D): base with row index[b, j] replaced by src[b, j].
ENAT_API at::Tensor scatter_tokens_cuda(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src);

// In place: base (B, L, D) (not expanded) gets base[b, index[b, j]] = src[b, j]; index (B, n), src (B, n, D).
ENAT_API void scatter_tokens_inplace_cuda(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src);

// index (B, n), src (B, n, D), L >= n -> (B, L, D): zeros with row index[b, j] = src[b, j].
ENAT_API at::Tensor scatter_into_zeros_cuda(const at::Tensor& index, const at::Tensor& src, int64_t L);

// x (B, L, D), index (B, n) -> (B, L, D): x with the rows at index set to zero.
ENAT_API at::Tensor zero_rows_cuda(const at::Tensor& x, const at::Tensor& index);

// x (B, L, D), mask (B, L) with n_masked Trues per row -> (visible (B, L - n_masked, D), masked
// (B, n_masked, D)), the False / True rows in ascending position order.
ENAT_API std::tuple<at::Tensor, at::Tensor> split_tokens_cuda(const at::Tensor& x, const at::Tensor& mask,
                                                               int64_t n_masked);

// visible (B, L - n, D), masked (B, n, D), mask (B, L) with n Trues per row -> (B, L, D): the inverse of
// split_tokens_cuda (rows a violating mask has no source for are zero).
ENAT_API at::Tensor restore_tokens_cuda(const at::Tensor& visible, const at::Tensor& masked, const at::Tensor& mask);

// fresh (B, nf, D), fresh_index (B, nf), cached (B, nc, D), cached_index (B, nc), disjoint position sets
// -> (B, nf + nc, D): the union of both row sets in ascending position order.
ENAT_API at::Tensor merge_cache_cuda(const at::Tensor& fresh, const at::Tensor& fresh_index, const at::Tensor& cached,
                                     const at::Tensor& cached_index);

// grad (B, nf + nc, D), fresh_index (B, nf), cached_index (B, nc) -> (grad_fresh (B, nf, D),
// grad_cached (B, nc, D)): the rows of grad at the ranks merge_cache_cuda gave fresh and cached rows.
ENAT_API std::tuple<at::Tensor, at::Tensor> merge_cache_backward_cuda(const at::Tensor& grad,
                                                                      const at::Tensor& fresh_index,
                                                                      const at::Tensor& cached_index);

}  // namespace enat
