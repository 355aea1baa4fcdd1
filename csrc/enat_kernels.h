// C++ API of the enat_kernels CUDA kernels, for libtorch programs that link the library built by
// CMakeLists.txt. The same kernels are reachable through the dispatcher as torch::ops enat::<name>.
#pragma once

#include <torch/types.h>

#include <tuple>

namespace enat {

// Attention of q over [k_ctx ; k_self] without concatenating: q (B, H, Lq, D); k_ctx, v_ctx (B, H, Lc, D);
// k_self, v_self (B, H, Ls, D); same dtype (fp16, bf16, fp32) and device, contiguous last dimension,
// any other strides, 1 <= D <= 128, Lc + Ls > 0. Returns out = softmax(q k^T * scale) v as
// (B, H, Lq, D) contiguous in the input dtype, and lse (B, H, Lq) fp32, the natural-log log-sum-exp of
// the scaled scores.
std::tuple<at::Tensor, at::Tensor> asymmetric_attention_cuda(const at::Tensor& q, const at::Tensor& k_ctx,
                                                             const at::Tensor& v_ctx, const at::Tensor& k_self,
                                                             const at::Tensor& v_self, double scale);

// Rows of x at index: x (B, L, D) with a contiguous last dimension, index (B, n) int64 with
// positions in [0, L), unique within a row. Returns (B, n, D), contiguous. One launch, no host sync;
// positions are not range-checked on the device.
at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index);

}  // namespace enat
