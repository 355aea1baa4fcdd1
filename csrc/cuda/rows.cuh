// Row-copy machinery shared by the token-movement kernels (gather_tokens.cu, tokens.cu).
//
// Token tensors are (B, rows, D) of any dtype with a contiguous last dimension; a row is moved as raw
// bytes in chunks of 16, 8, 4, 2 or 1 bytes. The chunk is the widest one that divides the row size
// and, for every tensor a kernel touches, its base address and both byte strides, so every chunk
// access is naturally aligned. A row is moved by a group of `threads_per_row` consecutive threads
// (threadIdx.x), `rows_per_block` groups per block (threadIdx.y). All offsets are 64-bit.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace enat {
namespace rows {

inline constexpr int kRowThreads = 256;  // threads per block of a row kernel

template <int Bytes> struct Chunk;
template <> struct Chunk<16> { using type = uint4; };
template <> struct Chunk<8> { using type = uint2; };
template <> struct Chunk<4> { using type = uint32_t; };
template <> struct Chunk<2> { using type = uint16_t; };
template <> struct Chunk<1> { using type = uint8_t; };

// Rows of a (B, rows, D) tensor: base pointer and byte strides of the first two dimensions. The
// stride of a dimension of size 1 is stored as 0 (it only ever multiplies index 0), so it neither
// narrows the chunk nor matters to the address.
template <typename Byte>
struct Rows {
  Byte* data;
  int64_t stride_b;
  int64_t stride_l;

  __host__ __device__ __forceinline__ Byte* row(int64_t b, int64_t l) const {
    return data + b * stride_b + l * stride_l;
  }
  // Host side: whether chunks of `width` bytes are aligned in every row.
  bool aligned(int64_t width) const {
    return reinterpret_cast<uintptr_t>(data) % static_cast<uintptr_t>(width) == 0 && stride_b % width == 0 &&
           stride_l % width == 0;
  }
};
using InRows = Rows<const char>;
using OutRows = Rows<char>;

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

// An int64 (B, n) index tensor with element strides; rows hold ascending positions.
struct IndexRows {
  const int64_t* data;
  int64_t stride_b;
  int64_t stride_n;
  int64_t n;

  __host__ __device__ __forceinline__ int64_t at(int64_t b, int64_t j) const { return data[b * stride_b + j * stride_n]; }
  // Number of entries of row b that are < value (lower bound; the row is ascending). In [0, n].
  __host__ __device__ __forceinline__ int64_t count_less(int64_t b, int64_t value) const {
    int64_t lo = 0, hi = n;  // entries [0, lo) are < value, entries [hi, n) are >= value
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (at(b, mid) < value) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo;
  }
};

inline IndexRows index_rows(const at::Tensor& index) {
  return {index.const_data_ptr<int64_t>(), index.stride(0), index.stride(1), index.size(1)};
}

// Widest chunk (16, 8, 4, 2 or 1 bytes) that divides row_bytes and is aligned for every Rows given.
template <typename... R>
int widest_chunk(int64_t row_bytes, const R&... rows) {
  for (int width = 16; width > 1; width /= 2) {
    if (row_bytes % width == 0 && (rows.aligned(width) && ...)) return width;
  }
  return 1;
}

// Calls f(std::integral_constant<int, width>{}) for a width returned by widest_chunk.
template <typename F>
void dispatch_chunk(int width, F&& f) {
  switch (width) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// Block shape for rows of `chunks` chunks: threads_per_row (a power of two, >= chunks up to the
// block size) times rows_per_block == kRowThreads.
struct Geometry {
  int threads_per_row;
  int rows_per_block;
};
inline Geometry geometry(int64_t chunks) {
  int t = 1;
  while (t < chunks && t < kRowThreads) t *= 2;
  return {t, kRowThreads / t};
}

// Copies one row of `chunks` chunks with the `lanes` threads of a group (this thread is `lane`).
// Two chunks per thread are loaded before they are stored when the row is long enough.
template <int Bytes>
__device__ __forceinline__ void copy_row(char* __restrict__ to, const char* __restrict__ from, int64_t chunks,
                                         int lane, int lanes) {
  using T = typename Chunk<Bytes>::type;
  const T* __restrict__ src = reinterpret_cast<const T*>(from);
  T* __restrict__ dst = reinterpret_cast<T*>(to);
  const int64_t step = lanes;
  int64_t c = lane;
  for (; c + step < chunks; c += 2 * step) {
    const T v0 = src[c], v1 = src[c + step];
    dst[c] = v0;
    dst[c + step] = v1;
  }
  if (c < chunks) dst[c] = src[c];
}

// Zero-fills one row, as copy_row.
template <int Bytes>
__device__ __forceinline__ void zero_row(char* __restrict__ to, int64_t chunks, int lane, int lanes) {
  using T = typename Chunk<Bytes>::type;
  T* __restrict__ dst = reinterpret_cast<T*>(to);
  const T zero{};
  for (int64_t c = lane; c < chunks; c += lanes) dst[c] = zero;
}

// copy_row, or zero_row when from is nullptr.
template <int Bytes>
__device__ __forceinline__ void move_row(char* to, const char* from, int64_t chunks, int lane, int lanes) {
  if (from != nullptr) {
    copy_row<Bytes>(to, from, chunks, lane, lanes);
  } else {
    zero_row<Bytes>(to, chunks, lane, lanes);
  }
}

}  // namespace rows
}  // namespace enat
