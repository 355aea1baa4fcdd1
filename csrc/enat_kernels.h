// C++ API of the enat_kernels CUDA kernels, for libtorch programs that link the library built by
// CMakeLists.txt. The same kernels are reachable through the dispatcher as torch::ops enat::<name>.
#pragma once

#include <torch/types.h>

namespace enat {

// Rows of x at index: x (B, L, D) with a contiguous last dimension, index (B, n) int64 with
// positions in [0, L), unique within a row. Returns (B, n, D), contiguous. One launch, no host sync;
// positions are not range-checked on the device.
at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index);

}  // namespace enat
