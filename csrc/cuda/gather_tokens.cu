// gather_tokens: out[b, j, :] = x[b, index[b, j], :].
//
// The copy is dtype-agnostic: rows are moved as bytes in the widest chunk (16, 8, 4, 2 or 1 bytes)
// that divides the row size, both row strides and the base address, so aligned fp16/bf16 rows with
// D % 8 == 0 use 16-byte loads and stores (rows.cuh). A block covers `rows_per_block` output rows with
// `threads_per_row` threads each; offsets are 64-bit.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../check.h"
#include "../enat_kernels.h"
#include "rows.cuh"

namespace enat {
namespace {

template <int Bytes>
__global__ void __launch_bounds__(rows::kRowThreads)
    gather_rows_kernel(const rows::InRows x, const rows::IndexRows index, const rows::OutRows out, int64_t total_rows,
                       int64_t chunks) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= total_rows) return;
  const int64_t b = row / index.n;
  const int64_t j = row - b * index.n;
  rows::copy_row<Bytes>(out.row(b, j), x.row(b, index.at(b, j)), chunks, threadIdx.x, blockDim.x);
}

}  // namespace

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index) {
  ENAT_CHECK_CUDA("x", x);
  ENAT_CHECK_DIM("x", x, 3);
  ENAT_CHECK_DIM("index", index, 2);
  ENAT_CHECK_DTYPE("index", index, at::kLong);
  ENAT_CHECK_SAME_DEVICE("x", x, "index", index);
  ENAT_CHECK_SIZE("index", index, 0, "x", x, 0);
  ENAT_CHECK_LAST_DIM_CONTIGUOUS("x", x);

  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), index.size(1), x.size(2)}, x.options());
  if (out.numel() == 0) return out;

  const int64_t row_bytes = x.size(2) * x.element_size();
  const rows::InRows x_rows = rows::in_rows(x);
  const rows::OutRows out_rows = rows::out_rows(out);
  const int width = rows::widest_chunk(row_bytes, x_rows, out_rows);
  const int64_t chunks = row_bytes / width;
  const rows::Geometry g = rows::geometry(chunks);
  const int64_t total_rows = out.size(0) * out.size(1);
  const int64_t blocks = (total_rows + g.rows_per_block - 1) / g.rows_per_block;
  TORCH_CHECK(blocks <= INT32_MAX, "enat: gather_tokens_cuda: too many rows (", total_rows, ")");
  const dim3 block(g.threads_per_row, g.rows_per_block);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  rows::dispatch_chunk(width, [&](auto w) {
    gather_rows_kernel<decltype(w)::value><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        x_rows, rows::index_rows(index), out_rows, total_rows, chunks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(enat, CUDA, m) { m.impl("gather_tokens_cuda", &gather_tokens_cuda); }

}  // namespace enat
