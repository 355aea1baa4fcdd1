// The rows.cuh views of tensor arguments, for the token-movement launchers (gather_tokens.cu, tokens.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>

#include "rows.cuh"

namespace enat {
namespace rows {

inline InRows in_rows(const at::Tensor& t) {
  const int64_t e = t.element_size();
  return {static_cast<const char*>(t.const_data_ptr()), t.size(0) > 1 ? t.stride(0) * e : 0,
          t.size(1) > 1 ? t.stride(1) * e : 0};
}
inline OutRows out_rows(const at::Tensor& t) {
  const int64_t e = t.element_size();
  return {static_cast<char*>(t.mutable_data_ptr()), t.size(0) > 1 ? t.stride(0) * e : 0,
          t.size(1) > 1 ? t.stride(1) * e : 0};
}
inline InRows no_in_rows() { return {nullptr, 0, 0}; }
inline OutRows no_out_rows() { return {nullptr, 0, 0}; }

inline IndexRows index_rows(const at::Tensor& index) {
  return {index.const_data_ptr<int64_t>(), index.stride(0), index.stride(1), index.size(1)};
}

// plan() for the current device.
inline Plan plan_here(int64_t B, int64_t items, int64_t row_bytes, int width) {
  return plan(B, items, row_bytes, width, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

}  // namespace rows
}  // namespace enat
