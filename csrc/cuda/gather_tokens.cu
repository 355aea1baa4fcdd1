// gather_tokens: out[b, j, :] = x[b, index[b, j], :].
//
// The copy is dtype-agnostic: rows are moved as bytes in the widest chunk (16, 8, 4, 2 or 1 bytes)
// that divides the row size, both row strides and the base address, so aligned fp16/bf16 rows with
// D % 8 == 0 use 16-byte loads and stores. A block covers `rows_per_block` output rows with
// `threads_per_row` threads each; offsets are 64-bit.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../check.h"
#include "../enat_kernels.h"

namespace enat {
namespace {

constexpr int kThreads = 256;

template <int Bytes> struct Chunk;
template <> struct Chunk<16> { using type = uint4; };
template <> struct Chunk<8> { using type = uint2; };
template <> struct Chunk<4> { using type = uint32_t; };
template <> struct Chunk<2> { using type = uint16_t; };
template <> struct Chunk<1> { using type = uint8_t; };

template <int Bytes>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(
    const char* __restrict__ x, const int64_t* __restrict__ index, char* __restrict__ out,
    int64_t rows, int64_t n, int64_t chunks_per_row, int64_t x_stride_b, int64_t x_stride_l,
    int64_t index_stride_b, int64_t index_stride_n) {
  using T = typename Chunk<Bytes>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t b = row / n;
  const int64_t j = row - b * n;
  const int64_t src = index[b * index_stride_b + j * index_stride_n];
  const T* __restrict__ from = reinterpret_cast<const T*>(x + b * x_stride_b + src * x_stride_l);
  T* __restrict__ to = reinterpret_cast<T*>(out + row * chunks_per_row * Bytes);
  for (int64_t c = threadIdx.x; c < chunks_per_row; c += blockDim.x) to[c] = from[c];
}

template <int Bytes>
void launch(const at::Tensor& x, const at::Tensor& index, at::Tensor& out, int64_t row_bytes) {
  const int64_t B = x.size(0), n = index.size(1), rows = B * n;
  const int64_t chunks = row_bytes / Bytes;
  int threads_per_row = 1;
  while (threads_per_row < chunks && threads_per_row < kThreads) threads_per_row *= 2;
  const int rows_per_block = kThreads / threads_per_row;
  const dim3 block(threads_per_row, rows_per_block);
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= INT32_MAX, "enat: gather_tokens_cuda: too many rows (", rows, ")");
  const int64_t esize = x.element_size();
  gather_rows_kernel<Bytes><<<static_cast<unsigned>(blocks), block, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const char*>(x.const_data_ptr()), index.const_data_ptr<int64_t>(),
      static_cast<char*>(out.mutable_data_ptr()), rows, n, chunks, x.stride(0) * esize, x.stride(1) * esize,
      index.stride(0), index.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

  // Widest chunk that divides the row size, both row strides and the base address.
  const int64_t esize = x.element_size();
  const int64_t row_bytes = x.size(2) * esize;
  const auto address = reinterpret_cast<uintptr_t>(x.const_data_ptr());
  int width = 16;
  while (width > 1 && (row_bytes % width != 0 || (x.stride(0) * esize) % width != 0 ||
                       (x.stride(1) * esize) % width != 0 || address % width != 0)) {
    width /= 2;
  }
  switch (width) {
    case 16: launch<16>(x, index, out, row_bytes); break;
    case 8: launch<8>(x, index, out, row_bytes); break;
    case 4: launch<4>(x, index, out, row_bytes); break;
    case 2: launch<2>(x, index, out, row_bytes); break;
    default: launch<1>(x, index, out, row_bytes); break;
  }
  return out;
}

TORCH_LIBRARY_IMPL(enat, CUDA, m) { m.impl("gather_tokens_cuda", &gather_tokens_cuda); }

}  // namespace enat
