// Device code of the critical-token movement kernels (docs/OPS.md, section 2) that tokens.cu launches:
// mask_to_index, scatter (out of place, in place, into zeros), zero_rows, split / restore and
// merge_cache (forward and backward); gather_tokens' kernel (gather_kernels.cuh) shares the design. No
// torch headers, so scripts/cuda_resources.py compiles the kernels alone.
//
// Design: copy bandwidth needs many bytes in flight per SM, so the row kernels are built around that.
// Every op is one launch (none when its result is empty), never syncs with the host, and uses int64
// offsets throughout.
//  * Rows are raw bytes moved in chunks of Bytes = 16/8/4/2/1, the widest one that the row size, every
//    base address and every row stride allow (any dtype, any strides with a contiguous last dim).
//  * Persistent blocks of 256 threads, grid = min(tiles, SMs x 3) (the SM count is read from the device
//    properties); each block takes a contiguous range of tiles. A tile is `tile` (8..256, the largest
//    power of two that still gives each block about two tiles) consecutive items of one batch row.
//  * Per tile, a table phase computes the positions once, one item per thread: a (source row,
//    destination row) pointer pair per item in shared memory (source nullptr: zero-fill; destination
//    nullptr: skip). The table is double-buffered, so a plain tile costs one __syncthreads.
//  * Then a move phase: groups of `lanes` threads (the fewest power of two <= 32 that covers the row
//    with kVec chunks per lane: a warp for a 2 KB row, one thread for a 6-byte row, several rows per
//    warp in between) take the tile's items two at a time; each lane loads all its chunks of both rows
//    into registers (64 bytes per row per lane for 16-byte chunks, so up to 128 bytes in flight per
//    lane) before storing any. Data is read and written once: streaming hints (__ldcs / __stcs).
//  Table phase per kind (move_rows_kernel, a runtime kind uniform over the launch; 5 instantiations,
//  one per chunk width):
//    kScatter        items = output rows l of a tile [l0, l0 + len). Every slot starts as "from base row
//                    l" (zero without a base); one 32-ary warp search per tile finds j0 = the first index
//                    entry >= l0, then thread t reads index[b, j0 + t] once and, if it falls in the tile,
//                    points that slot at src row j0 + t (zero without src). Serves scatter_tokens,
//                    scatter_into_zeros (no base) and zero_rows (no src).
//    kScatterInplace items = j < n: base[b, index[b, j]] = src[b, j]; positions outside [0, L) skipped.
//    kSplit/kRestore items = positions l. A ballot scan of the tile's mask entries plus the number of
//                    True entries before the tile gives every position its rank r among the Trues (l - r
//                    among the Falses). That count is carried from tile to tile within a block's range;
//                    only a block's first tile (if not at l = 0) reads the mask prefix, so the mask is
//                    ranked once. Split = gathers to the ranks (ranks past an output are skipped),
//                    restore = scatters from them (missing sources zero-filled): a mask that violates
//                    the count never goes out of bounds.
//    kMerge/Backward items = merged rows r of a tile [r0, r1). Two warps find the merge-path splits at r0
//                    and r1 (32-ary searches: fresh rows i0, i1 before them, cached c0 = r0 - i0, c1);
//                    the tile's fresh and cached positions go to shared memory and each is ranked within
//                    the tile by a binary search there (ties: fresh first, as a stable sort). Forward:
//                    merged row r <- its fresh / cached row; backward: the reverse. The splits are
//                    clamped so that any index contents stay in bounds (unset rows: zero / skipped).
//  * gather_rows_kernel (gather_kernels.cuh): the same tiles; per tile, thread t loads index[b, j0 + t]
//    once and writes the pointer pair of output row j0 + t, then the move phase as above.
//  * mask_to_index_kernel: one block per batch row walks the mask 256 positions at a time, ranking the
//    True entries with a warp ballot plus per-warp counts; the (j+1)-th True goes to out[b, j] for
//    j < count, missing slots get L.
// Index rows are ascending and unique (not checked on the device).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rows.cuh"

namespace enat {
namespace tokens {

constexpr int kThreads = rows::kThreads;
constexpr int kWarps = rows::kWarps;
constexpr int kTile = rows::kTile;

// A (B, L) bool mask with element (= byte) strides.
struct MaskRows {
  const uint8_t* data;
  int64_t stride_b;
  int64_t stride_l;

  __host__ __device__ __forceinline__ bool at(int64_t b, int64_t l) const { return data[b * stride_b + l * stride_l] != 0; }
};

// ---------------------------------------------------------------------------------------------
// mask_to_index

// Number of threads before this one whose flag is set; *total = all set flags. All kThreads threads
// must call it. s_warp: kWarps entries.
__device__ __forceinline__ int64_t block_rank(bool flag, int64_t* s_warp, int64_t* total) {
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  if (lane == 0) s_warp[warp] = __popc(ballot);
  __syncthreads();
  int64_t before = __popc(ballot & ((1u << lane) - 1u)), sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    const int64_t c = s_warp[w];
    if (w < warp) before += c;
    sum += c;
  }
  __syncthreads();  // s_warp may be reused
  *total = sum;
  return before;
}

__global__ void __launch_bounds__(kThreads)
    mask_to_index_kernel(const MaskRows mask, int64_t L, int64_t* __restrict__ out, int64_t count) {
  __shared__ int64_t s_warp[kWarps];
  const int64_t b = blockIdx.x;
  int64_t* __restrict__ row = out + b * count;
  int64_t found = 0;  // True entries in [0, c0); the same in every thread
  for (int64_t c0 = 0; c0 < L && found < count; c0 += kThreads) {
    const int64_t l = c0 + threadIdx.x;
    const bool flag = l < L && mask.at(b, l);
    int64_t total;
    const int64_t j = found + block_rank(flag, s_warp, &total);
    if (flag && j < count) row[j] = l;
    found += total;
  }
  for (int64_t j = found + threadIdx.x; j < count; j += kThreads) row[j] = L;  // missing Trues
}

// ---------------------------------------------------------------------------------------------
// The generic row mover.

enum class Kind : int { kScatter, kScatterInplace, kMerge, kMergeBackward, kSplit, kRestore };

struct Params {
  Kind kind;
  int64_t items;  // work items per batch row
  rows::Plan plan;
  rows::InRows in0, in1;
  rows::OutRows out0, out1;
  rows::IndexRows idx0, idx1;
  MaskRows mask;
  int64_t limit0, limit1;  // kScatterInplace: L in limit0; kSplit/kRestore: rows of side 0 (True) / 1 (False)
};

struct Shared {
  rows::Table table;
  int64_t key[2][kTile];         // kMerge*: the tile's fresh (0) and cached (1) positions
  int64_t warp[2][kWarps][2];    // kSplit/kRestore: per warp (mask prefix count, tile count), by tile parity
  int64_t cut[2];                // kScatter: first index entry >= l0; kMerge*: fresh rows before r0, r1
};

// Entries of the ascending s[0, n) that are < v (upper: <= v).
__device__ __forceinline__ int count_below(const int64_t* s, int n, int64_t v, bool upper) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (s[mid] < v || (upper && s[mid] == v)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Table phases: fill sh.table (from / to) slots [0, len) of buffer buf for the tile starting at item
// t0 of batch row b. All kThreads threads call them; thread t owns item t.

__device__ __forceinline__ void table_scatter(const Params& p, Shared& sh, int buf, int64_t b, int64_t l0, int len) {
  const int t = threadIdx.x;
  if (t < len) {
    sh.table.from[buf][t] = p.in1.data != nullptr ? p.in1.row(b, l0 + t) : nullptr;
    sh.table.to[buf][t] = p.out0.row(b, l0 + t);
  }
  if (t < 32) {
    const int64_t j0 = rows::warp_partition(0, p.idx0.n, [&](int64_t j) { return p.idx0.at(b, j) < l0; });
    if (t == 0) sh.cut[0] = j0;
  }
  __syncthreads();
  const int64_t j = sh.cut[0] + t;
  if (j < p.idx0.n) {
    const int64_t v = p.idx0.at(b, j);
    if (v >= l0 && v < l0 + len) sh.table.from[buf][v - l0] = p.in0.data != nullptr ? p.in0.row(b, j) : nullptr;
  }
}

__device__ __forceinline__ void table_scatter_inplace(const Params& p, Shared& sh, int buf, int64_t b, int64_t j0,
                                                      int len) {
  const int t = threadIdx.x;
  if (t < len) {
    const int64_t v = p.idx0.at(b, j0 + t);
    sh.table.from[buf][t] = p.in0.row(b, j0 + t);
    sh.table.to[buf][t] = v >= 0 && v < p.limit0 ? p.out0.row(b, v) : nullptr;
  }
}

// *carried: True entries before the tile when the block's previous tile was the one before it (the
// caller passes first = true otherwise); on return, True entries up to the tile's end.
__device__ __forceinline__ void table_split_restore(const Params& p, Shared& sh, int buf, int64_t b, int64_t t0,
                                                    int len, bool first, int64_t* carried) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const bool count_prefix = first && t0 > 0;  // uniform over the block
  long long partial = 0;
  if (count_prefix) {
    for (int64_t l = t; l < t0; l += kThreads) partial += p.mask.at(b, l) ? 1 : 0;
    for (int offset = 16; offset > 0; offset /= 2) partial += __shfl_xor_sync(0xffffffffu, partial, offset);
  }
  const int64_t l = t0 + t;
  const bool flag = t < len && p.mask.at(b, l);
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) {
    sh.warp[buf][warp][0] = partial;
    sh.warp[buf][warp][1] = __popc(ballot);
  }
  __syncthreads();
  int64_t prefix = 0, before = __popc(ballot & ((1u << lane) - 1u)), total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    prefix += sh.warp[buf][w][0];
    const int64_t c = sh.warp[buf][w][1];
    if (w < warp) before += c;
    total += c;
  }
  if (!count_prefix) prefix = t0 > 0 ? *carried : 0;
  *carried = prefix + total;
  if (t < len) {
    const int64_t r = prefix + before;  // True entries in [0, l)
    const bool kept = flag ? r < p.limit0 : l - r < p.limit1;
    const int64_t rank = flag ? r : l - r;
    if (p.kind == Kind::kSplit) {
      sh.table.from[buf][t] = p.in0.row(b, l);
      sh.table.to[buf][t] = kept ? (flag ? p.out0 : p.out1).row(b, rank) : nullptr;
    } else {
      sh.table.from[buf][t] = kept ? (flag ? p.in0 : p.in1).row(b, rank) : nullptr;
      sh.table.to[buf][t] = p.out0.row(b, l);
    }
  }
}

__device__ __forceinline__ void table_merge(const Params& p, Shared& sh, int buf, int64_t b, int64_t r0, int len) {
  const int t = threadIdx.x, warp = t >> 5;
  const bool forward = p.kind == Kind::kMerge;
  const int64_t nf = p.idx0.n, nc = p.idx1.n;
  if (t < len) {  // unset rows (only for index rows that break the contract): zero / skipped
    sh.table.from[buf][t] = forward ? nullptr : p.in0.row(b, r0 + t);
    sh.table.to[buf][t] = forward ? p.out0.row(b, r0 + t) : nullptr;
  }
  if (warp < 2) {  // merge path: fresh rows among the first d merged rows (ties: fresh first)
    const int64_t d = r0 + (warp == 0 ? 0 : len);
    const int64_t i = rows::warp_partition(d > nc ? d - nc : 0, d < nf ? d : nf, [&](int64_t i) {
      return p.idx0.at(b, i) <= p.idx1.at(b, d - 1 - i);
    });
    if ((t & 31) == 0) sh.cut[warp] = i;
  }
  __syncthreads();
  const int64_t i0 = sh.cut[0];
  const int64_t i1 = sh.cut[1] < i0 ? i0 : (sh.cut[1] > i0 + len ? i0 + len : sh.cut[1]);
  const int64_t c0 = r0 - i0;
  const int nfl = static_cast<int>(i1 - i0), ncl = len - nfl;
  if (t < nfl) sh.key[0][t] = p.idx0.at(b, i0 + t);
  if (t < ncl) sh.key[1][t] = p.idx1.at(b, c0 + t);
  __syncthreads();
  // Row t of side s (0: fresh rows from i0, 1: cached rows from c0) at its rank among the merged rows.
  const int n[2] = {nfl, ncl};
  const int64_t first[2] = {i0, c0};
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    if (t >= n[s]) continue;
    const int rank = t + count_below(sh.key[1 - s], n[1 - s], sh.key[s][t], s == 1);
    if (forward) {
      sh.table.from[buf][rank] = (s == 0 ? p.in0 : p.in1).row(b, first[s] + t);
    } else {
      sh.table.to[buf][rank] = (s == 0 ? p.out0 : p.out1).row(b, first[s] + t);
    }
  }
}

// 3 blocks of 256 threads per SM: up to 80 registers (72-80 used by the 8- and 16-byte movers), no
// spills for sm_80 and sm_90; 768 threads x up to 128 bytes = 96 KB in flight per SM.
template <int Bytes>
__global__ void __launch_bounds__(kThreads, rows::kBlocksPerSM) move_rows_kernel(const Params p) {
  __shared__ Shared sh;
  const rows::UnitRange range = rows::unit_range(p.plan.units);
  int64_t carried = 0;
  int buf = 0;
  for (int64_t u = range.begin; u < range.end; ++u, buf ^= 1) {
    const int64_t b = u / p.plan.tiles_per_row;
    const int64_t t0 = (u - b * p.plan.tiles_per_row) * p.plan.tile;
    const int64_t rest = p.items - t0;
    const int len = rest < p.plan.tile ? static_cast<int>(rest) : p.plan.tile;
    switch (p.kind) {  // uniform over the launch
      case Kind::kScatter: table_scatter(p, sh, buf, b, t0, len); break;
      case Kind::kScatterInplace: table_scatter_inplace(p, sh, buf, b, t0, len); break;
      case Kind::kSplit:
      case Kind::kRestore: table_split_restore(p, sh, buf, b, t0, len, u == range.begin, &carried); break;
      case Kind::kMerge:
      case Kind::kMergeBackward: table_merge(p, sh, buf, b, t0, len); break;
    }
    __syncthreads();
    rows::move_tile<Bytes>(sh.table.from[buf], sh.table.to[buf], len, p.plan.chunks, p.plan.lanes);
  }
}

}  // namespace tokens
}  // namespace enat
