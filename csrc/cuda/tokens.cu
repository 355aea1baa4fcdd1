// Critical-token movement kernels (OPS.md section 2): mask_to_index, scatter (out of place, in place,
// into zeros), zero_rows, split / restore and merge_cache (forward and backward).
//
// Design. Every op is one launch (none at all when its result is empty) and never syncs with the host.
//  * mask_to_index_kernel: one block per batch row; the block walks the mask in chunks of 256
//    positions, one per thread, and ranks the True entries with a warp ballot plus per-warp counts in
//    shared memory. The (j+1)-th True goes to out[b, j] for j < count; missing slots get L.
//  * move_rows_kernel<Bytes>: one generic row mover for all other ops. Rows are raw bytes moved in
//    chunks of Bytes (16/8/4/2/1, the widest one that the row size, every base address and every row
//    stride allow; rows.cuh). The grid is B x tiles: a block takes `tile` consecutive work items of one
//    batch row, `rows_per_block` items at a time, one thread group per item. locate() maps a work item
//    to (source row or nullptr = zero fill, destination row or nullptr = skip) by the op kind (a
//    runtime enum, uniform over the launch):
//      kScatter        item = output row l; j = lower_bound(index[b], l); source = in0 row j when
//                      index[b, j] == l (nullptr in0: zero), else in1 row l (nullptr in1: zero). Serves
//                      scatter_tokens (in0 = src, in1 = base), scatter_into_zeros (in1 = none) and
//                      zero_rows (in0 = none, in1 = x).
//      kScatterInplace item = j < n; base[b, index[b, j]] = src[b, j]; positions outside [0, L) are skipped.
//      kMerge          item = source row r < nf + nc, fresh (r < nf) or cached; its output rank is its
//                      own row j plus the number of the other side's positions below its position.
//      kMergeBackward  the same ranks, reversed: grad_fresh / grad_cached row j = grad row rank.
//      kSplit/kRestore item = position l. Before the copy the block ranks its tile: the number of
//                      True entries before the tile (block reduction over mask[b, :t0]) plus the
//                      exclusive ballot count inside the tile (tile <= 256, one position per thread),
//                      kept in shared memory as r (True: rank among Trues) or ~(l - r) (False: rank
//                      among Falses). Ranks outside the output are skipped (split) or zero-filled
//                      (restore), so a mask that violates the count never goes out of bounds.
//    The tile is rows_per_block items, except for split/restore, where it grows (up to 256) until
//    32 * tile >= L, which bounds the mask re-reading to 32 bytes per row moved.
// Index rows are ascending and unique (not checked on the device); int64 offsets throughout.
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

constexpr int kThreads = rows::kRowThreads;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads % 32 == 0, "whole warps");

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

__device__ __forceinline__ int thread_rank() { return threadIdx.y * blockDim.x + threadIdx.x; }

// Sum of v over the block (all kThreads threads must call it). s_warp: kWarps entries.
__device__ __forceinline__ int64_t block_sum(int64_t v, int64_t* s_warp) {
  long long s = v;
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
  const int tid = thread_rank();
  if ((tid & 31) == 0) s_warp[tid >> 5] = s;
  __syncthreads();
  int64_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += s_warp[w];
  __syncthreads();  // s_warp may be reused
  return total;
}

// Number of threads before this one (in thread order) whose flag is set; *total = all set flags.
// All kThreads threads must call it. s_warp: kWarps entries.
__device__ __forceinline__ int64_t block_rank(bool flag, int64_t* s_warp, int64_t* total) {
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int tid = thread_rank();
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

// ---------------------------------------------------------------------------------------------
// mask_to_index

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
  int64_t items;   // work items per batch row
  int64_t tile;    // consecutive items per block, a multiple of rows_per_block, <= kThreads
  int64_t tiles;   // blocks per batch row
  int64_t chunks;  // chunks per row
  rows::InRows in0, in1;
  rows::OutRows out0, out1;
  rows::IndexRows idx0, idx1;
  MaskRows mask;
  int64_t limit0, limit1;  // kScatterInplace: L in limit0; kSplit/kRestore: rows of side 0 (True) / 1 (False)
};

struct Move {
  const char* from;  // nullptr: zero-fill
  char* to;          // nullptr: nothing to do
};

// Ranks the block's tile [t0, t1) of positions of mask row b into s_rank (see the top of the file).
// All kThreads threads must call it; t1 - t0 <= kThreads.
__device__ __forceinline__ void rank_tile(const MaskRows& mask, int64_t b, int64_t t0, int64_t t1, int64_t* s_rank,
                                          int64_t* s_warp) {
  const int tid = thread_rank();
  int64_t partial = 0;
  for (int64_t l = tid; l < t0; l += kThreads) partial += mask.at(b, l) ? 1 : 0;
  const int64_t before = block_sum(partial, s_warp);
  const int64_t l = t0 + tid;
  const bool flag = l < t1 && mask.at(b, l);
  int64_t total;
  const int64_t r = before + block_rank(flag, s_warp, &total);  // True entries in [0, l)
  if (l < t1) s_rank[tid] = flag ? r : ~(l - r);
  __syncthreads();
}

__host__ __device__ __forceinline__ Move locate(const Params& p, int64_t b, int64_t item, const int64_t* s_rank, int64_t t0) {
  switch (p.kind) {
    case Kind::kScatter: {
      const int64_t j = p.idx0.count_less(b, item);
      const bool hit = j < p.idx0.n && p.idx0.at(b, j) == item;
      const char* from = nullptr;
      if (hit) {
        if (p.in0.data != nullptr) from = p.in0.row(b, j);
      } else {
        if (p.in1.data != nullptr) from = p.in1.row(b, item);
      }
      return {from, p.out0.row(b, item)};
    }
    case Kind::kScatterInplace: {
      const int64_t pos = p.idx0.at(b, item);
      if (pos < 0 || pos >= p.limit0) return {nullptr, nullptr};
      return {p.in0.row(b, item), p.out0.row(b, pos)};
    }
    case Kind::kMerge:
    case Kind::kMergeBackward: {
      const int64_t nf = p.idx0.n;
      const bool cached = item >= nf;
      const int64_t j = cached ? item - nf : item;
      // j + (positions of the other side below this one) < nf + nc for any index contents.
      const int64_t rank = cached ? j + p.idx0.count_less(b, p.idx1.at(b, j)) : j + p.idx1.count_less(b, p.idx0.at(b, j));
      if (p.kind == Kind::kMerge) return {(cached ? p.in1 : p.in0).row(b, j), p.out0.row(b, rank)};
      return {p.in0.row(b, rank), (cached ? p.out1 : p.out0).row(b, j)};
    }
    case Kind::kSplit: {
      const int64_t v = s_rank[item - t0];
      char* to = nullptr;
      if (v >= 0) {
        if (v < p.limit0) to = p.out0.row(b, v);
      } else {
        if (~v < p.limit1) to = p.out1.row(b, ~v);
      }
      return {p.in0.row(b, item), to};
    }
    case Kind::kRestore: {
      const int64_t v = s_rank[item - t0];
      const char* from = nullptr;
      if (v >= 0) {
        if (v < p.limit0) from = p.in0.row(b, v);
      } else {
        if (~v < p.limit1) from = p.in1.row(b, ~v);
      }
      return {from, p.out0.row(b, item)};
    }
  }
  return {nullptr, nullptr};
}

// 8 blocks of 256 threads per SM (full occupancy) caps registers at 32; ptxas fits every width in
// that without spills for sm_80 and sm_90.
template <int Bytes>
__global__ void __launch_bounds__(kThreads, 8) move_rows_kernel(const Params p) {
  __shared__ int64_t s_rank[kThreads];
  __shared__ int64_t s_warp[kWarps];
  const int64_t block = blockIdx.x;
  const int64_t b = block / p.tiles;
  const int64_t t0 = (block - b * p.tiles) * p.tile;
  const int64_t t1 = t0 + p.tile < p.items ? t0 + p.tile : p.items;
  if (p.kind == Kind::kSplit || p.kind == Kind::kRestore) {  // uniform over the launch
    rank_tile(p.mask, b, t0, t1, s_rank, s_warp);
  }
  for (int64_t item = t0 + threadIdx.y; item < t1; item += blockDim.y) {
    const Move m = locate(p, b, item, s_rank, t0);
    if (m.to == nullptr) continue;
    rows::move_row<Bytes>(m.to, m.from, p.chunks, threadIdx.x, blockDim.x);
  }
}

// Items per block: one per thread group, but split/restore grow the tile (up to one position per
// thread) until 32 * tile >= L, bounding the re-reading of mask[b, :t0] by rank_tile.
int64_t choose_tile(Kind kind, int64_t rows_per_block, int64_t items) {
  int64_t tile = rows_per_block;
  if (kind == Kind::kSplit || kind == Kind::kRestore) {
    while (tile < kThreads && tile * 32 < items) tile *= 2;
  }
  return tile;
}

// Launches move_rows_kernel over B batch rows of p.items items (both > 0), rows of row_bytes (> 0)
// moved in chunks of `width`.
void launch_move(Params p, int64_t B, int64_t row_bytes, int width, const char* op) {
  p.chunks = row_bytes / width;
  const rows::Geometry g = rows::geometry(p.chunks);
  p.tile = choose_tile(p.kind, g.rows_per_block, p.items);
  p.tiles = (p.items + p.tile - 1) / p.tile;
  TORCH_CHECK(p.tiles <= INT32_MAX / B, "enat: ", op, ": too many rows (", B, " x ", p.items, ")");
  const int64_t blocks = B * p.tiles;
  const dim3 block(g.threads_per_row, g.rows_per_block);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  rows::dispatch_chunk(width, [&](auto w) {
    move_rows_kernel<decltype(w)::value><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
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
void scatter_rows(const at::Tensor& out, const at::Tensor* base, const at::Tensor& index, const at::Tensor* src,
                  const char* op) {
  const int64_t B = out.size(0), L = out.size(1), row_bytes = out.size(2) * out.element_size();
  if (B == 0 || L == 0 || row_bytes == 0) return;
  Params p = make_params(Kind::kScatter, L);
  p.out0 = rows::out_rows(out);
  p.idx0 = rows::index_rows(index);
  if (src != nullptr) p.in0 = rows::in_rows(*src);
  if (base != nullptr) p.in1 = rows::in_rows(*base);
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.out0, p.in0, p.in1), op);
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
  scatter_rows(out, &base, index, &src, "scatter_tokens_cuda");
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
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.out0, p.in0), "scatter_tokens_inplace_cuda");
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
  scatter_rows(out, nullptr, index, &src, "scatter_into_zeros_cuda");
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
  scatter_rows(out, &x, index, nullptr, "zero_rows_cuda");
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
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.in0, p.out0, p.out1), "split_tokens_cuda");
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
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.in0, p.in1, p.out0), "restore_tokens_cuda");
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
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.in0, p.in1, p.out0), "merge_cache_cuda");
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
  launch_move(p, B, row_bytes, rows::widest_chunk(row_bytes, p.in0, p.out0, p.out1), "merge_cache_backward_cuda");
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
