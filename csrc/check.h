// Input checks shared by the CUDA launchers. Every message names the argument and shows its shape,
// so a C++ caller gets the same kind of error as a Python caller of enat_kernels.ops.
#pragma once

#include <torch/types.h>

#include <sstream>
#include <string>

namespace enat {

inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << t.scalar_type() << t.sizes() << " on " << t.device();
  return s.str();
}

}  // namespace enat

#define ENAT_CHECK_CUDA(name, t) \
  TORCH_CHECK_VALUE((t).is_cuda(), "enat: ", name, " must be a CUDA tensor, got ", ::enat::describe(t))

#define ENAT_CHECK_DIM(name, t, n) \
  TORCH_CHECK_VALUE((t).dim() == (n), "enat: ", name, " must have ", n, " dimensions, got ", ::enat::describe(t))

#define ENAT_CHECK_DTYPE(name, t, dtype) \
  TORCH_CHECK_TYPE((t).scalar_type() == (dtype), "enat: ", name, " must be ", dtype, ", got ", ::enat::describe(t))

#define ENAT_CHECK_SAME_DEVICE(name_a, a, name_b, b)                                                   \
  TORCH_CHECK_VALUE((a).device() == (b).device(), "enat: ", name_a, " and ", name_b,                   \
                    " must be on the same device, got ", ::enat::describe(a), " and ", ::enat::describe(b))

#define ENAT_CHECK_SIZE(name_a, a, dim_a, name_b, b, dim_b)                                              \
  TORCH_CHECK_VALUE((a).size(dim_a) == (b).size(dim_b), "enat: ", name_a, ".shape[", dim_a, "] must equal ", \
                    name_b, ".shape[", dim_b, "], got ", ::enat::describe(a), " and ", ::enat::describe(b))

#define ENAT_CHECK_LAST_DIM_CONTIGUOUS(name, t)                                                            \
  TORCH_CHECK_VALUE((t).size(-1) <= 1 || (t).stride(-1) == 1, "enat: ", name,                                \
                    " must be contiguous in its last dimension, got strides ", (t).strides(), " for ", \
                    ::enat::describe(t))
