// Input checks shared by the CUDA launchers. Every message names the argument and shows its shape,
// so a C++ caller gets the same kind of error as a Python caller of enat_kernels.ops.
//
// Messages are built from std::string pieces only and thrown by out-of-line functions (check.cpp):
// no iostream code is compiled into the library, so an error path never runs stream code built from
// one compiler's headers against another compiler's libstdc++.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <type_traits>

namespace enat {

// "Half[2, 3] on cuda:0": dtype, shape and device.
std::string describe(const at::Tensor& t);

// The text of one message part.
std::string text(c10::IntArrayRef values);  // "[2, 3]"
std::string text(c10::ScalarType dtype);     // "Half"
std::string text(double value);
inline std::string text(const char* s) { return s; }
inline const std::string& text(const std::string& s) { return s; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string text(T value) {
  return std::to_string(value);
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out = "enat: ";
  ((out += text(parts)), ...);
  return out;
}

// Throw c10::ValueError / c10::TypeError (Python: ValueError / TypeError) with `message`.
[[noreturn]] void throw_value_error(const std::string& message);
[[noreturn]] void throw_type_error(const std::string& message);

}  // namespace enat

// A value check with a free-form message: ENAT_CHECK_VALUE(cond, "count must be >= 0, got ", count).
#define ENAT_CHECK_VALUE(cond, ...)                                          \
  do {                                                                       \
    if (C10_UNLIKELY(!(cond))) ::enat::throw_value_error(::enat::message(__VA_ARGS__)); \
  } while (false)

// A type check with a free-form message.
#define ENAT_CHECK_TYPE(cond, ...)                                          \
  do {                                                                      \
    if (C10_UNLIKELY(!(cond))) ::enat::throw_type_error(::enat::message(__VA_ARGS__)); \
  } while (false)

#define ENAT_CHECK_CUDA(name, t) \
  ENAT_CHECK_VALUE((t).is_cuda(), name, " must be a CUDA tensor, got ", ::enat::describe(t))

#define ENAT_CHECK_DIM(name, t, n) \
  ENAT_CHECK_VALUE((t).dim() == (n), name, " must have ", n, " dimensions, got ", ::enat::describe(t))

#define ENAT_CHECK_DTYPE(name, t, dtype) \
  ENAT_CHECK_TYPE((t).scalar_type() == (dtype), name, " must be ", dtype, ", got ", ::enat::describe(t))

#define ENAT_CHECK_SAME_DEVICE(name_a, a, name_b, b)                                      \
  ENAT_CHECK_VALUE((a).device() == (b).device(), name_a, " and ", name_b,                 \
                   " must be on the same device, got ", ::enat::describe(a), " and ", ::enat::describe(b))

#define ENAT_CHECK_SIZE(name_a, a, dim_a, name_b, b, dim_b)                                              \
  ENAT_CHECK_VALUE((a).size(dim_a) == (b).size(dim_b), name_a, ".shape[", dim_a, "] must equal ", name_b, \
                   ".shape[", dim_b, "], got ", ::enat::describe(a), " and ", ::enat::describe(b))

#define ENAT_CHECK_LAST_DIM_CONTIGUOUS(name, t)                                                   \
  ENAT_CHECK_VALUE((t).size(-1) <= 1 || (t).stride(-1) == 1, name,                                \
                   " must be contiguous in its last dimension, got strides ", (t).strides(), " for ", \
                   ::enat::describe(t))

#define ENAT_CHECK_SAME_DTYPE(name_a, a, name_b, b)                                                \
  ENAT_CHECK_TYPE((a).scalar_type() == (b).scalar_type(), name_a, " and ", name_b,                 \
                  " must have the same dtype, got ", ::enat::describe(a), " and ", ::enat::describe(b))

// No dimension of size > 1 with stride 0 (an expanded tensor), so that writing to t is well defined.
#define ENAT_CHECK_NOT_EXPANDED(name, t)                                                               \
  do {                                                                                                 \
    for (int64_t enat_dim_ = 0; enat_dim_ < (t).dim(); ++enat_dim_) {                                  \
      ENAT_CHECK_VALUE((t).size(enat_dim_) <= 1 || (t).stride(enat_dim_) != 0, name,                   \
                       " is written in place and must not be expanded (stride 0 in dimension ", enat_dim_, \
                       "), got strides ", (t).strides(), " for ", ::enat::describe(t));               \
    }                                                                                                  \
  } while (false)
