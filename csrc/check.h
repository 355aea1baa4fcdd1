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

#define ENAT_CHECK_SAME_DTYPE(name_a, a, name_b, b)                                                   \
  TORCH_CHECK_TYPE((a).scalar_type() == (b).scalar_type(), "enat: ", name_a, " and ", name_b,         \
                   " must have the same dtype, got ", ::enat::describe(a), " and ", ::enat::describe(b))

// A value check with a free-form message: ENAT_CHECK_VALUE(cond, "count must be >= 0, got ", count).
#define ENAT_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE((cond), "enat: ", __VA_ARGS__)

// No dimension of size > 1 with stride 0 (an expanded tensor), so that writing to t is well defined.
#define ENAT_CHECK_NOT_EXPANDED(name, t)                                                                  \
  do {                                                                                                    \
    for (int64_t enat_dim_ = 0; enat_dim_ < (t).dim(); ++enat_dim_) {                                     \
      TORCH_CHECK_VALUE((t).size(enat_dim_) <= 1 || (t).stride(enat_dim_) != 0, "enat: ", name,         \
                        " is written in place and must not be expanded (stride 0 in dimension ", enat_dim_, \
                        "), got strides ", (t).strides(), " for ", ::enat::describe(t));                  \
    }                                                                                                     \
  } while (false)
