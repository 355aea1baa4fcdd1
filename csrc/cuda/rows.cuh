// Row-copy machinery shared by the token-movement kernels (token_kernels.cuh); the design is described
// at the top of token_kernels.cuh. No torch headers: rows_tensors.h makes these structs from tensors.
//
// Token tensors are (B, rows, D) of any dtype with a contiguous last dimension; a row is moved as raw
// bytes in chunks of 16, 8, 4, 2 or 1 bytes. The chunk is the widest one that divides the row size
// and, for every tensor a kernel touches, its base address and both byte strides, so every chunk
// access is naturally aligned. All offsets are 64-bit.
//
// Work is cut into tiles: `tile` consecutive items (rows) of one batch row. A block of kThreads
// threads takes a contiguous range of tiles (persistent blocks, grid = SMs x kBlocksPerSM at most);
// for each tile it first writes a table of (source row, destination row) pointers into shared memory
// (indices, ranks and positions are computed there once per tile), then moves the tile's rows with
// groups of `lanes` threads (1..32, a power of two; kThreads / lanes groups per block).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace enat {
namespace rows {

inline constexpr int kThreads = 256;     // threads per block of a row kernel
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kTile = kThreads;   // most items per tile: one per thread in the table phase
inline constexpr int kMinTile = 8;       // fewest items per tile the planner picks
inline constexpr int kBlocksPerSM = 3;   // resident blocks per SM (__launch_bounds__ minimum)
static_assert(kThreads % 32 == 0 && kTile <= kThreads, "whole warps, one table slot per thread");

template <int Bytes> struct Chunk;
template <> struct Chunk<16> { using type = uint4; };
template <> struct Chunk<8> { using type = uint2; };
template <> struct Chunk<4> { using type = unsigned int; };
template <> struct Chunk<2> { using type = unsigned short; };
template <> struct Chunk<1> { using type = unsigned char; };

// Chunks a lane loads (into registers) per row before it stores any: 64 bytes for 16- and 8-byte
// chunks, 8 chunks below. A group moves two rows at once, so a lane has up to twice that in flight.
template <int Bytes> inline constexpr int kVec = Bytes >= 8 ? 64 / Bytes : 8;
inline int vec_of(int width) { return width >= 8 ? 64 / width : 8; }

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

// An int64 (B, n) index tensor with element strides; rows hold ascending positions.
struct IndexRows {
  const int64_t* data;
  int64_t stride_b;
  int64_t stride_n;
  int64_t n;

  __host__ __device__ __forceinline__ int64_t at(int64_t b, int64_t j) const { return data[b * stride_b + j * stride_n]; }
};

// Widest chunk (16, 8, 4, 2 or 1 bytes) that divides row_bytes and is aligned for every Rows given.
template <typename... R>
int widest_chunk(int64_t row_bytes, const R&... rows) {
  for (int width = 16; width > 1; width /= 2) {
    if (row_bytes % width == 0 && (rows.aligned(width) && ...)) return width;
  }
  return 1;
}

// Calls f(std::integral_constant<int, width>{}) for every chunk width: the row kernels' instantiations.
template <typename F>
void for_each_chunk(F&& f) {
  f(std::integral_constant<int, 16>{});
  f(std::integral_constant<int, 8>{});
  f(std::integral_constant<int, 4>{});
  f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

// Calls f(std::integral_constant<int, width>{}) for a width returned by widest_chunk.
template <typename F>
void dispatch_chunk(int width, F&& f) {
  for_each_chunk([&](auto w) {
    if (decltype(w)::value == width) f(w);
  });
}

// ---------------------------------------------------------------------------------------------
// Launch plan (host).

struct Plan {
  int64_t chunks;         // chunks per row
  int lanes;              // threads per row: 1..32, a power of two
  int tile;               // items per tile, a power of two in [kMinTile, kTile]
  int64_t tiles_per_row;  // tiles per batch row
  int64_t units;          // tiles in all, B * tiles_per_row
  int grid;               // blocks: min(units, SMs * kBlocksPerSM)
};

// Plan for B batch rows of `items` rows each (both > 0), rows of row_bytes (> 0) bytes in chunks of
// `width`, on a device with sm_count SMs. Lanes per row: the fewest (a power of two, at most a warp)
// that cover the row with kVec chunks each. Tile: the largest that still gives every resident block
// about two tiles or more.
inline Plan plan(int64_t B, int64_t items, int64_t row_bytes, int width, int sm_count) {
  Plan p{};
  p.chunks = row_bytes / width;
  const int64_t vec = vec_of(width);
  p.lanes = 1;
  while (p.lanes < 32 && p.lanes * vec < p.chunks) p.lanes *= 2;
  const int64_t cap = static_cast<int64_t>(sm_count) * kBlocksPerSM;
  p.tile = kTile;
  auto tiles = [&](int64_t t) { return (items + t - 1) / t; };
  while (p.tile > kMinTile && B * tiles(p.tile) < 2 * cap) p.tile /= 2;
  p.tiles_per_row = tiles(p.tile);
  p.units = B * p.tiles_per_row;
  p.grid = static_cast<int>(std::min<int64_t>(p.units, cap));
  return p;
}

// ---------------------------------------------------------------------------------------------
// Device side.

// The contiguous range [begin, end) of the `units` tiles that this block takes (sizes differ by at most one).
struct UnitRange {
  int64_t begin, end;
};
__device__ __forceinline__ UnitRange unit_range(int64_t units) {
  const int64_t k = blockIdx.x, grid = gridDim.x;
  const int64_t per = units / grid, extra = units % grid;
  const int64_t begin = k * per + (k < extra ? k : extra);
  return {begin, begin + per + (k < extra ? 1 : 0)};
}

// Pointer table of one tile: item t moves from[t] (nullptr: zero-fill) to to[t] (nullptr: skip).
// Double-buffered by tile parity, so one __syncthreads per tile separates writing and reading it.
struct Table {
  const char* from[2][kTile];
  char* to[2][kTile];
};

// Smallest i in [lo, hi) with !pred(i), or hi when pred holds on all of it; pred is monotone (true
// then false). The 32 lanes of a warp call it together (it is a 32-ary search: each round tests 32
// pivots, about log32(hi - lo) rounds). For any pred the result is in [lo, hi].
template <typename Pred>
__device__ __forceinline__ int64_t warp_partition(int64_t lo, int64_t hi, Pred pred) {
  const int lane = threadIdx.x & 31;
  while (lo < hi) {
    const int64_t n = hi - lo;
    const int64_t x = n <= 32 ? lo + lane : lo + ((lane + 1) * n) / 32 - 1;
    const unsigned ball = __ballot_sync(0xffffffffu, x < hi && pred(x));
    if (ball == 0xffffffffu) return hi;  // pred(hi - 1) holds
    const int m = __ffs(~ball) - 1;      // first pivot where pred fails
    if (n <= 32) return lo + m;
    const int64_t next_hi = lo + ((m + 1) * n) / 32 - 1;  // pred(next_hi) fails
    lo = m == 0 ? lo : lo + (m * n) / 32;                 // pred holds at the pivot before
    hi = next_hi;
  }
  return lo;
}

// Moves one pair of rows (to0 / to1 nullptr: skip; from nullptr: zero-fill) with the `lanes` threads
// of a group, this one being `lane`. Every lane loads kVec chunks of each row before it stores any;
// chunk c goes to lane c % lanes, so each load and store instruction is coalesced across the group.
// Source rows are read once and destination rows written once: streaming hints (.cs) on both.
template <int Bytes>
__device__ __forceinline__ void move_pair(char* to0, const char* from0, char* to1, const char* from1, int64_t chunks,
                                          int lane, int lanes) {
  using T = typename Chunk<Bytes>::type;
  constexpr int V = kVec<Bytes>;
  const T* __restrict__ src0 = reinterpret_cast<const T*>(from0);
  const T* __restrict__ src1 = reinterpret_cast<const T*>(from1);
  T* __restrict__ dst0 = reinterpret_cast<T*>(to0);
  T* __restrict__ dst1 = reinterpret_cast<T*>(to1);
  const bool load0 = to0 != nullptr && from0 != nullptr, load1 = to1 != nullptr && from1 != nullptr;
  const int64_t step = static_cast<int64_t>(lanes) * V;
  for (int64_t c0 = lane; c0 < chunks; c0 += step) {
    T a[V], b[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = c0 + static_cast<int64_t>(k) * lanes;
      a[k] = T{};
      b[k] = T{};
      if (c < chunks) {
        if (load0) a[k] = __ldcs(src0 + c);
        if (load1) b[k] = __ldcs(src1 + c);
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = c0 + static_cast<int64_t>(k) * lanes;
      if (c < chunks) {
        if (dst0 != nullptr) __stcs(dst0 + c, a[k]);
        if (dst1 != nullptr) __stcs(dst1 + c, b[k]);
      }
    }
  }
}

// Moves the `len` rows of a tile table: group g takes items g, g + groups, ... two at a time.
template <int Bytes>
__device__ __forceinline__ void move_tile(const char* const* from, char* const* to, int len, int64_t chunks, int lanes) {
  const int tid = threadIdx.x;
  const int lane = tid & (lanes - 1);
  const int groups = kThreads / lanes;
  for (int t = tid / lanes; t < len; t += 2 * groups) {
    const int u = t + groups;
    move_pair<Bytes>(to[t], from[t], u < len ? to[u] : nullptr, u < len ? from[u] : nullptr, chunks, lane, lanes);
  }
}

}  // namespace rows
}  // namespace enat
