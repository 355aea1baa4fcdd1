// Critical-token movement kernels (docs/OPS.md, section 2): mask_to_index, scatter (out of place, in
// place, into zeros), zero_rows, split / restore and merge_cache (forward and backward); gather_tokens
// (gather_tokens.cu) shares the row machinery of rows.cuh.
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
//  * mask_to_index_kernel: one block per batch row walks the mask 256 positions at a time, ranking the
//    True entries with a warp ballot plus per-warp counts; the (j+1)-th True goes to out[b, j] for
//    j < count, missing slots get L.
// Index rows are ascending and unique (not checked on the device).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../check.h"
#include "../enat_kernels.h"
#include "rows.cuh"

namespace enat {
namespace {

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

MaskRows mask_rows(const at::Tensor& mask) {
  return {static_cast<const uint8_t*>(mask.const_data_ptr()), mask.stride(0), mask.stride(1)};
}

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
  if (t < nfl) {
    const int rank = t + count_below(sh.key[1], ncl, sh.key[0][t], false);
    if (forward) {
      sh.table.from[buf][rank] = p.in0.row(b, i0 + t);
    } else {
      sh.table.to[buf][rank] = p.out0.row(b, i0 + t);
    }
  }
  if (t < ncl) {
    const int rank = t + count_below(sh.key[0], nfl, sh.key[1][t], true);
    if (forward) {
      sh.table.from[buf][rank] = p.in1.row(b, c0 + t);
    } else {
      sh.table.to[buf][rank] = p.out1.row(b, c0 + t);
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

// Launches move_rows_kernel over B batch rows of p.items items (both > 0), rows of row_bytes (> 0)
// moved in chunks of `width`.
void launch_move(Params p, int64_t B, int64_t row_bytes, int width) {
  p.plan = rows::plan(B, p.items, row_bytes, width);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  rows::dispatch_chunk(width, [&](auto w) {
    move_rows_kernel<decltype(w)::value><<<p.plan.grid, kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Params make_params(Kind kind, int64_t items) {
  Params p{};
  p.kind = kind;
  p.items = items;
  p.in0 = p.in1 = rows::no_in_rows();
  p.out0 = p.out1 = rows::no_out_rows();
  p.idx0 = p.idx1 = rows::IndexRows{nullptr, 0, 0, 0};
  p.mask = MaskRows{nullptr, 0, 0};
  return p;
}

// Checks of a (B, rows, D) token tensor and an int64 (B, n) index tensor.
void check_tokens(const char* name, const at::Tensor& t) {
  ENAT_CHECK_CUDA(name, t);
  ENAT_CHECK_DIM(name, t, 3);
  ENAT_CHECK_LAST_DIM_CONTIGUOUS(name, t);
}
void check_index(const char* name, const at::Tensor& index) {
  ENAT_CHECK_CUDA(name, index);
  ENAT_CHECK_DIM(name, index, 2);
  ENAT_CHECK_DTYPE(name, index, at::kLong);
}
void check_mask(const char* name, const at::Tensor& mask) {
  ENAT_CHECK_CUDA(name, mask);
  ENAT_CHECK_DIM(name, mask, 2);
  ENAT_CHECK_DTYPE(name, mask, at::kBool);
}

// Shared by scatter_tokens_cuda, scatter_into_zeros_cuda and zero_rows_cuda: out (B, L, D) where the
// rows at index come from src (or zero without src) and the others from base (or zero without base).
void scatter_rows(const at::Tensor& out, const at::Tensor* base, const at::Tensor& index, const at::Tensor* src) {
  const int64_t B = out.size(0), L = out.size(1), row_bytes = out.size(2) * out.element_size();
  if (B == 0 || L == 0 || row_bytes == 0) return;
  Params p = make_params(Kind::kScatter, L);
  p.out0 = rows::out_rows(out);
  p.idx0 = rows::index_rows(index);
  if (src != nullptr) p.in0 = rows::in_rows(*src);
  if (base != nullptr) p.in1 = rows::in_rows(*base);
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.out0, p.in0, p.in1));
}

// The arguments of both scatters: base (B, L, D), index (B, n), src (B, n, D), n <= L.
void check_scatter(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src) {
  check_tokens("base", base);
  check_index("index", index);
  check_tokens("src", src);
  ENAT_CHECK_SAME_DEVICE("base", base, "index", index);
  ENAT_CHECK_SAME_DEVICE("base", base, "src", src);
  ENAT_CHECK_SAME_DTYPE("base", base, "src", src);
  ENAT_CHECK_SIZE("index", index, 0, "base", base, 0);
  ENAT_CHECK_SIZE("src", src, 0, "base", base, 0);
  ENAT_CHECK_SIZE("src", src, 1, "index", index, 1);
  ENAT_CHECK_SIZE("src", src, 2, "base", base, 2);
  ENAT_CHECK_VALUE(index.size(1) <= base.size(1), "index has more positions than base has rows, got index ",
                   ::enat::describe(index), " and base ", ::enat::describe(base));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

at::Tensor mask_to_index_cuda(const at::Tensor& mask, int64_t count) {
  check_mask("mask", mask);
  ENAT_CHECK_VALUE(count >= 0, "count must be >= 0, got ", count);
  const c10::cuda::CUDAGuard guard(mask.device());
  const int64_t B = mask.size(0), L = mask.size(1);
  auto out = at::empty({B, count}, mask.options().dtype(at::kLong));
  if (B == 0 || count == 0) return out;
  TORCH_CHECK(B <= INT32_MAX, "enat: mask_to_index_cuda: too many rows (", B, ")");
  mask_to_index_kernel<<<static_cast<unsigned>(B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask_rows(mask), L, out.mutable_data_ptr<int64_t>(), count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor scatter_tokens_cuda(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src) {
  check_scatter(base, index, src);
  const c10::cuda::CUDAGuard guard(base.device());
  auto out = at::empty({base.size(0), base.size(1), base.size(2)}, base.options());
  scatter_rows(out, &base, index, &src);
  return out;
}

void scatter_tokens_inplace_cuda(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src) {
  check_scatter(base, index, src);
  ENAT_CHECK_NOT_EXPANDED("base", base);
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t B = base.size(0), n = index.size(1), row_bytes = base.size(2) * base.element_size();
  if (B == 0 || n == 0 || row_bytes == 0) return;
  Params p = make_params(Kind::kScatterInplace, n);
  p.out0 = rows::out_rows(base);
  p.in0 = rows::in_rows(src);
  p.idx0 = rows::index_rows(index);
  p.limit0 = base.size(1);
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.out0, p.in0));
}

at::Tensor scatter_into_zeros_cuda(const at::Tensor& index, const at::Tensor& src, int64_t L) {
  check_index("index", index);
  check_tokens("src", src);
  ENAT_CHECK_SAME_DEVICE("src", src, "index", index);
  ENAT_CHECK_SIZE("index", index, 0, "src", src, 0);
  ENAT_CHECK_SIZE("src", src, 1, "index", index, 1);
  ENAT_CHECK_VALUE(L >= index.size(1), "L must be >= the number of positions in index, got L = ", L,
                   " and index ", ::enat::describe(index));
  const c10::cuda::CUDAGuard guard(src.device());
  auto out = at::empty({src.size(0), L, src.size(2)}, src.options());
  scatter_rows(out, nullptr, index, &src);
  return out;
}

at::Tensor zero_rows_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_tokens("x", x);
  check_index("index", index);
  ENAT_CHECK_SAME_DEVICE("x", x, "index", index);
  ENAT_CHECK_SIZE("index", index, 0, "x", x, 0);
  ENAT_CHECK_VALUE(index.size(1) <= x.size(1), "index has more positions than x has rows, got index ",
                   ::enat::describe(index), " and x ", ::enat::describe(x));
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  scatter_rows(out, &x, index, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> split_tokens_cuda(const at::Tensor& x, const at::Tensor& mask, int64_t n_masked) {
  check_tokens("x", x);
  check_mask("mask", mask);
  ENAT_CHECK_SAME_DEVICE("x", x, "mask", mask);
  ENAT_CHECK_SIZE("mask", mask, 0, "x", x, 0);
  ENAT_CHECK_SIZE("mask", mask, 1, "x", x, 1);
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  ENAT_CHECK_VALUE(n_masked >= 0 && n_masked <= L, "n_masked must be in [0, ", L, "] for x ", ::enat::describe(x),
                   ", got ", n_masked);
  const c10::cuda::CUDAGuard guard(x.device());
  auto visible = at::empty({B, L - n_masked, D}, x.options());
  auto masked = at::empty({B, n_masked, D}, x.options());
  const int64_t row_bytes = D * x.element_size();
  if (B == 0 || L == 0 || row_bytes == 0) return {visible, masked};
  Params p = make_params(Kind::kSplit, L);
  p.in0 = rows::in_rows(x);
  p.out0 = rows::out_rows(masked);
  p.out1 = rows::out_rows(visible);
  p.mask = mask_rows(mask);
  p.limit0 = n_masked;
  p.limit1 = L - n_masked;
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.in0, p.out0, p.out1));
  return {visible, masked};
}

at::Tensor restore_tokens_cuda(const at::Tensor& visible, const at::Tensor& masked, const at::Tensor& mask) {
  check_tokens("visible", visible);
  check_tokens("masked", masked);
  check_mask("mask", mask);
  ENAT_CHECK_SAME_DEVICE("visible", visible, "masked", masked);
  ENAT_CHECK_SAME_DEVICE("visible", visible, "mask", mask);
  ENAT_CHECK_SAME_DTYPE("visible", visible, "masked", masked);
  ENAT_CHECK_SIZE("visible", visible, 0, "mask", mask, 0);
  ENAT_CHECK_SIZE("masked", masked, 0, "mask", mask, 0);
  ENAT_CHECK_SIZE("masked", masked, 2, "visible", visible, 2);
  ENAT_CHECK_VALUE(visible.size(1) + masked.size(1) == mask.size(1),
                   "visible.shape[1] + masked.shape[1] must equal mask.shape[1], got visible ",
                   ::enat::describe(visible), ", masked ", ::enat::describe(masked), " and mask ",
                   ::enat::describe(mask));
  const c10::cuda::CUDAGuard guard(visible.device());
  const int64_t B = mask.size(0), L = mask.size(1), D = visible.size(2);
  auto out = at::empty({B, L, D}, visible.options());
  const int64_t row_bytes = D * visible.element_size();
  if (B == 0 || L == 0 || row_bytes == 0) return out;
  Params p = make_params(Kind::kRestore, L);
  p.in0 = rows::in_rows(masked);
  p.in1 = rows::in_rows(visible);
  p.out0 = rows::out_rows(out);
  p.mask = mask_rows(mask);
  p.limit0 = masked.size(1);
  p.limit1 = visible.size(1);
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.in0, p.in1, p.out0));
  return out;
}

at::Tensor merge_cache_cuda(const at::Tensor& fresh, const at::Tensor& fresh_index, const at::Tensor& cached,
                            const at::Tensor& cached_index) {
  check_tokens("fresh", fresh);
  check_index("fresh_index", fresh_index);
  check_tokens("cached", cached);
  check_index("cached_index", cached_index);
  ENAT_CHECK_SAME_DEVICE("fresh", fresh, "fresh_index", fresh_index);
  ENAT_CHECK_SAME_DEVICE("fresh", fresh, "cached", cached);
  ENAT_CHECK_SAME_DEVICE("fresh", fresh, "cached_index", cached_index);
  ENAT_CHECK_SAME_DTYPE("fresh", fresh, "cached", cached);
  ENAT_CHECK_SIZE("fresh_index", fresh_index, 0, "fresh", fresh, 0);
  ENAT_CHECK_SIZE("fresh_index", fresh_index, 1, "fresh", fresh, 1);
  ENAT_CHECK_SIZE("cached", cached, 0, "fresh", fresh, 0);
  ENAT_CHECK_SIZE("cached", cached, 2, "fresh", fresh, 2);
  ENAT_CHECK_SIZE("cached_index", cached_index, 0, "cached", cached, 0);
  ENAT_CHECK_SIZE("cached_index", cached_index, 1, "cached", cached, 1);
  const c10::cuda::CUDAGuard guard(fresh.device());
  const int64_t B = fresh.size(0), nf = fresh.size(1), nc = cached.size(1), D = fresh.size(2);
  auto out = at::empty({B, nf + nc, D}, fresh.options());
  const int64_t row_bytes = D * fresh.element_size();
  if (B == 0 || nf + nc == 0 || row_bytes == 0) return out;
  Params p = make_params(Kind::kMerge, nf + nc);
  p.in0 = rows::in_rows(fresh);
  p.in1 = rows::in_rows(cached);
  p.out0 = rows::out_rows(out);
  p.idx0 = rows::index_rows(fresh_index);
  p.idx1 = rows::index_rows(cached_index);
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.in0, p.in1, p.out0));
  return out;
}

std::tuple<at::Tensor, at::Tensor> merge_cache_backward_cuda(const at::Tensor& grad, const at::Tensor& fresh_index,
                                                             const at::Tensor& cached_index) {
  check_tokens("grad", grad);
  check_index("fresh_index", fresh_index);
  check_index("cached_index", cached_index);
  ENAT_CHECK_SAME_DEVICE("grad", grad, "fresh_index", fresh_index);
  ENAT_CHECK_SAME_DEVICE("grad", grad, "cached_index", cached_index);
  ENAT_CHECK_SIZE("fresh_index", fresh_index, 0, "grad", grad, 0);
  ENAT_CHECK_SIZE("cached_index", cached_index, 0, "grad", grad, 0);
  const int64_t B = grad.size(0), nf = fresh_index.size(1), nc = cached_index.size(1), D = grad.size(2);
  ENAT_CHECK_VALUE(grad.size(1) == nf + nc,
                   "grad.shape[1] must equal fresh_index.shape[1] + cached_index.shape[1], got grad ",
                   ::enat::describe(grad), ", fresh_index ", ::enat::describe(fresh_index), " and cached_index ",
                   ::enat::describe(cached_index));
  const c10::cuda::CUDAGuard guard(grad.device());
  auto grad_fresh = at::empty({B, nf, D}, grad.options());
  auto grad_cached = at::empty({B, nc, D}, grad.options());
  const int64_t row_bytes = D * grad.element_size();
  if (B == 0 || nf + nc == 0 || row_bytes == 0) return {grad_fresh, grad_cached};
  Params p = make_params(Kind::kMergeBackward, nf + nc);
  p.in0 = rows::in_rows(grad);
  p.out0 = rows::out_rows(grad_fresh);
  p.out1 = rows::out_rows(grad_cached);
  p.idx0 = rows::index_rows(fresh_index);
  p.idx1 = rows::index_rows(cached_index);
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.in0, p.out0, p.out1));
  return {grad_fresh, grad_cached};
}

TORCH_LIBRARY_IMPL(enat, CUDA, m) {
  m.impl("mask_to_index_cuda", &mask_to_index_cuda);
  m.impl("scatter_tokens_cuda", &scatter_tokens_cuda);
  m.impl("scatter_tokens_inplace_cuda", &scatter_tokens_inplace_cuda);
  m.impl("scatter_into_zeros_cuda", &scatter_into_zeros_cuda);
  m.impl("zero_rows_cuda", &zero_rows_cuda);
  m.impl("split_tokens_cuda", &split_tokens_cuda);
  m.impl("restore_tokens_cuda", &restore_tokens_cuda);
  m.impl("merge_cache_cuda", &merge_cache_cuda);
  m.impl("merge_cache_backward_cuda", &merge_cache_backward_cuda);
}

}  // namespace enat
