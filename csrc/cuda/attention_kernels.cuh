// Device code of asymmetric_attention_cuda (launched by asymmetric_attention.cu): out = softmax(q @
// [k_ctx ; k_self]^T * scale) @ [v_ctx ; v_self], plus the natural-log log-sum-exp of the scaled scores,
// without concatenating the two key segments. No torch headers, so scripts/cuda_resources.py compiles
// the kernels (and runs the tile planner) alone.
//
// Design. One online softmax (running max m and sum l in the log2 domain, fp32 accumulation) walks the
// joined key range [0, Lc + Ls) ("virtual concatenation": each key row is read from whichever segment holds
// it, through that segment's own (b, h, l) strides with 64-bit offsets; a tile may straddle the boundary;
// an empty segment simply contributes no rows). The last dimension must be contiguous. The output is
// written through its own (b, h, l) strides: the launcher allocates it as (B, Lq, H, D), so that
// out.transpose(1, 2) is contiguous and feeds the output projection without a copy.
//  * Tensor-core path (fp16/bf16, compute capability >= 8.0, Hopper included), FlashAttention-2 style:
//    attn_tc_kernel<T, D_PAD, WARPS>, D_PAD = 32, 64, 96 or 128 >= D + the loader's column shift (below);
//    padded columns are zero in shared memory, so they change no dot product. Each warp owns 16 query rows;
//    WARPS = 4 (64-row blocks) or, for D_PAD = 64 and Lq > 64, 8 (128-row blocks); key tiles of 64. Q is
//    loaded once and kept in registers as mma A fragments (ldmatrix). Per tile: S = Q K^T with mma.sync
//    m16n8k16 (K through ldmatrix), keys >= Lc + Ls masked on the last tile only, row max / sum across the
//    4 lanes of a quad, P = exp2(S * scale * log2(e) - m) as one FMA, O rescaled in registers, P rounded
//    to T and used in registers as the A operand of O += P V (V through ldmatrix.trans). Shared rows are
//    padded by 16 bytes so ldmatrix is free of bank conflicts.
//  * Hopper runs the same mma.sync code (HMMA in SASS for sm_80 and sm_90 alike). Its warpgroup MMA
//    (wgmma) needs another kernel: operands in shared memory in wgmma's swizzled layouts behind matrix
//    descriptors, asynchronous issue with fences, an sm_90a code object that no other GPU runs, and TMA
//    plus warp-specialised producer/consumer pipelines to pay off (FlashAttention-3). mma.sync on an H100
//    reaches a fraction of the wgmma rate (the FlashAttention-3 paper puts FlashAttention-2, built like
//    this kernel, at about 35% of the H100's peak against 75% for its wgmma kernel), so on Hopper this
//    forward is expected to trail the Triton one, which emits wgmma.
//  * Tile loader: a 2-stage shared-memory pipeline of cp.async copies of W = 16, 8 or 4 bytes with
//    zero-fill (K/V tile t + 1 lands while tile t is used), or, for layouts no copy width fits, a
//    synchronous element-wise loader into the same buffers (W = 2). A copy must be W-aligned in global
//    and shared memory, and head dims like ENAT-S's 61 leave rows only 2- or 4-byte aligned: q/k/v are
//    views of the fused projection (B, L, 3, H, 61), row stride 1098 elements and head stride 61, so the
//    rows of odd heads start 2 bytes past a 4-byte boundary. The loader therefore shifts columns: with
//    row r of a block starting `shift` elements past a W-byte boundary (the same for every row when the
//    row stride is a multiple of W bytes), shared column j holds element j - shift, and every copy moves
//    one aligned W-byte piece of the row, which lands on an aligned shared address. The first copy of a
//    row also reads the `shift` elements before it (the aligned piece that holds element 0, so inside the
//    same allocation); those columns are zeroed in the Q and K fragments (the V ones only reach output
//    columns that are never stored). Copies past D zero-fill (cp.async src-size), rows past the range are
//    all zeros. Q and K of a block share one shift (their products pair columns), V has its own; the
//    output is read back from shared memory at V's shift. plan_tc picks, per launch, the copy width with
//    the smallest D_PAD (then the widest) for which every row stride is a multiple of W bytes and, for
//    every (b, h), q, k_ctx and k_self start at the same offset modulo W, and v_ctx and v_self too. For
//    ENAT-S this is W = 4 with shift = h % 2 into D_PAD = 64. The element-wise loader takes what is left:
//    a row stride odd in elements (a contiguous (B, H, L, 61) tensor: its rows alternate between two
//    alignments), q and k at different offsets modulo 4 bytes, or a shift that would need a larger D_PAD
//    than D alone (a D = 64 view starting at an odd element).
//  * Epilogue: lse = (m + log2 l) * ln 2; O / l staged as T in the warp's rows of the Q tile (read only by
//    this warp, long ago) and stored with the widest of 16-, 8-, 4-byte stores that the output row stride
//    and the staged row's alignment allow (2-byte stores for the elements before the first aligned one and
//    after the last); rows >= Lq and columns >= D are never written. The model's (B, Lq, H, D) output takes
//    16-byte stores for D = 64 and 4-byte stores for ENAT-S.
//  * Simple path (fp32 on any GPU, fp16/bf16 below sm_80, or too little shared memory): one warp per
//    query row, lanes split D (up to 4 columns each), one warp-shuffle dot product and scalar online
//    softmax step per key, 4 rows per block.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "rows.cuh"

namespace enat {
namespace attention {

constexpr int kMaxHeadDim = 128;
constexpr float kLn2 = 0.6931471805599453f;

// Explicit conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends).
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// Kernel arguments. Segment 0 is the context (k_ctx, v_ctx), segment 1 the self keys (k_self, v_self).
// Strides are in elements, ordered (b, h, l). lse is (B, H, Lq) contiguous.
template <typename T>
struct AttnParams {
  const T* q;
  const T* k[2];
  const T* v[2];
  T* out;
  float* lse;
  int64_t q_stride[3];
  int64_t k_stride[2][3];
  int64_t v_stride[2][3];
  int64_t out_stride[3];
  int64_t len[2];
  int64_t H;
  int64_t Lq;
  int64_t rows;  // B * H * Lq
  int D;
  float scale_log2;  // scale * log2(e)
};

// ---------------------------------------------------------------------------------------------------
// Tensor-core path (compute capability >= 8.0, fp16 / bf16).

constexpr int kBlockN = 64;  // keys per tile
constexpr int kStages = 2;   // K/V tiles in shared memory: tile t + 1 loads while tile t is used

// Block shape: WARPS warps of 16 query rows each; K/V tiles of kBlockN rows. Shared memory holds the Q
// tile (reused to stage the output) and kStages (K tile, V tile) pairs, all with a row pitch of D_PAD + 8
// elements: the 16 extra bytes put the 8 rows that one ldmatrix phase reads on distinct bank groups.
template <int D_PAD, int WARPS>
struct TcShape {
  static constexpr int kDPad = D_PAD;
  static constexpr int kWarps = WARPS;
  static constexpr int kThreads = WARPS * 32;
  static constexpr int kBlockM = WARPS * 16;
  static constexpr int kLd = D_PAD + 8;                    // row pitch, elements
  static constexpr int kTileElems = kBlockN * kLd;
  static constexpr int kStageElems = 2 * kTileElems;       // K tile, then V tile
  static constexpr int kQElems = kBlockM * kLd;
  static constexpr size_t kBytes = size_t(kQElems + kStages * kStageElems) * 2;  // dynamic shared memory
  // Up to 128 registers per thread for D_PAD <= 64 (4 blocks of 4 warps or 2 of 8 per SM), 255 above.
  static constexpr int kMinBlocks = D_PAD <= 64 ? 512 / kThreads : 1;

  static_assert(D_PAD % 16 == 0 && D_PAD <= kMaxHeadDim, "D_PAD");
  static_assert((kLd * 2) % 16 == 0 && ((kLd * 2) / 16) % 2 == 1, "row pitch: 16-byte aligned, odd chunks");
};

// The tensor-core shapes, in the order the launcher considers them: it takes the first whose D_PAD is the
// planned one, where a shape of 8 warps (128 query rows) serves Lq > 64 only. Every attn_tc_kernel
// instantiation comes from this list.
template <typename F>
void for_each_tc_shape(F&& f) {
  f(TcShape<32, 4>{});
  f(TcShape<64, 8>{});
  f(TcShape<64, 4>{});
  f(TcShape<96, 4>{});
  f(TcShape<128, 4>{});
}

// Tensor-core D_PAD for a head dim (plus column shift) d: 32, 64, 96 or 128; 0 above 128.
inline int round_head_dim(int64_t d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : 0; }

// A tensor argument as the planner sees it: address, sizes and element strides of (B, H, L, D).
struct Layout {
  uintptr_t addr;
  int64_t size[4];
  int64_t stride[4];
};

// How attn_tc_kernel loads its tiles: copy width (16, 8, 4: cp.async of that many bytes with column
// shifts; 2: the synchronous element-wise loader) and D_PAD.
struct TcPlan {
  int width;
  int d_pad;
};

// D_PAD for copies of w bytes, or 0 when w does not fit the layouts (2-byte elements; t = q, k_ctx,
// v_ctx, k_self, v_self): every row stride a multiple of w bytes, and for each (b, h) one start offset
// modulo w for q, k_ctx, k_self and one for v_ctx, v_self (empty segments aside). Residues modulo w
// repeat with period w in b and in h, so w x w heads cover all.
inline int copy_d_pad(const Layout (&t)[5], int64_t D, int w) {
  constexpr int kGroup[5] = {0, 0, 1, 0, 1};  // shift group: q and keys, values
  for (const Layout& x : t) {
    if (x.size[2] > 1 && (x.stride[2] * 2) % w != 0) return 0;
  }
  int max_shift = 0;
  for (int64_t b = 0; b < t[0].size[0] && b < w; ++b) {
    for (int64_t h = 0; h < t[0].size[1] && h < w; ++h) {
      int residue[2] = {-1, -1};
      for (int i = 0; i < 5; ++i) {
        if (t[i].size[2] == 0) continue;
        const uint64_t start = t[i].addr + 2 * static_cast<uint64_t>(b * t[i].stride[0] + h * t[i].stride[1]);
        const int r = static_cast<int>(start % static_cast<uint64_t>(w));
        int& g = residue[kGroup[i]];
        if (g >= 0 && g != r) return 0;
        g = r;
        max_shift = max_shift > r / 2 ? max_shift : r / 2;
      }
    }
  }
  return round_head_dim(D + max_shift);
}

// The plan for 2-byte inputs with head dim D <= kMaxHeadDim: the copy width with the smallest D_PAD, the
// widest among equals; the element-wise loader when no width fits or each needs a larger D_PAD than D's.
inline TcPlan plan_tc(const Layout (&t)[5], int64_t D) {
  TcPlan plan{2, round_head_dim(D)};
  for (int w = 16; w >= 4; w /= 2) {
    const int d_pad = copy_d_pad(t, D, w);
    if (d_pad != 0 && (plan.width == 2 ? d_pad <= plan.d_pad : d_pad < plan.d_pad)) plan = {w, d_pad};
  }
  return plan;
}

// PTX wrappers. Shared-memory operands are 32-bit shared-window addresses.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// W-byte global -> shared copy (W = 16 bypasses L1); src and dst W-aligned. It reads src_bytes (0..W)
// and zero-fills the rest: src_bytes = 0 reads nothing.
template <int W>
__device__ __forceinline__ void cp_async(uint32_t dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (W == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(W), "r"(src_bytes));
  }
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it
// (transposed with Trans).
template <bool Trans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ENAT_LDMATRIX_X4(trans)                                                                 \
  asm volatile("ldmatrix.sync.aligned.m8n8.x4" trans ".shared.b16 {%0, %1, %2, %3}, [%4];\n"    \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                 \
               : "r"(addr))
  if constexpr (Trans) ENAT_LDMATRIX_X4(".trans");
  else ENAT_LDMATRIX_X4("");
#undef ENAT_LDMATRIX_X4
#endif
}

// For T = __half or __nv_bfloat16: run, d += a (16x16, row-major fragment) * b (16x8, column-major
// fragment) with fp32 accumulation; pack, two floats as one register of two T, lo in the low half.
template <typename T>
struct Mma {
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  static_assert(kHalf || std::is_same_v<T, __nv_bfloat16>, "Mma<T>: T must be __half or __nv_bfloat16");

  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ENAT_MMA_M16N8K16(type)                                                                          \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." type "." type ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "  \
      "{%8, %9}, {%0, %1, %2, %3};\n"                                                                    \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
    if constexpr (kHalf) ENAT_MMA_M16N8K16("f16");
    else ENAT_MMA_M16N8K16("bf16");
#undef ENAT_MMA_M16N8K16
#endif
  }

  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const auto v = [&] {
      if constexpr (kHalf) {
        return __floats2half2_rn(lo, hi);
      } else {
        return __floats2bfloat162_rn(lo, hi);
      }
    }();
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
};

// Calls f(std::integral_constant<int, W>{}) for a plan's copy width (16, 8, 4; anything else: 2).
template <typename F>
__device__ __forceinline__ void with_copy_width(int width, F&& f) {
  switch (width) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 2>{}); break;
  }
}

// Elements one loader piece fills in a shared row: a W-byte copy, or 8 elements (one 16-byte shared
// store) for the element-wise loader (W = 2).
template <int W> inline constexpr int kPieceElems = W == 2 ? 8 : W / 2;

// Piece c of one shared row (columns [c E, c E + E), E = kPieceElems<W>) from the global row `row`
// (element 0 at `row`, column shift `shift`: column j holds element j - shift), zero where the row is out
// of range or the element is outside [0, D). W > 2: one cp.async of the aligned W bytes at row + c E -
// shift (leading elements < 0 are read: the caller masks their columns), src-size cut at D; `dummy` is a
// W-aligned address for the copies that read nothing. W = 2: shift is 0; element-wise loads and one
// 16-byte shared store.
template <int W, typename T>
__device__ __forceinline__ void load_piece(T* dst_row, const T* row, bool row_ok, int c, int shift, int D,
                                           const T* dummy) {
  constexpr int E = kPieceElems<W>;
  if constexpr (W > 2) {
    const int e0 = c * E - shift;
    const int n = row_ok ? (D - e0 < E ? D - e0 : E) : 0;  // elements read from e0 on (<= 0: none)
    cp_async<W>(smem_addr(dst_row + c * E), n > 0 ? static_cast<const void*>(row + e0) : dummy, n > 0 ? 2 * n : 0);
  } else {
    const int e0 = c * E;
    const uint16_t* const s = reinterpret_cast<const uint16_t*>(row) + e0;
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t lo = (row_ok && e0 + 2 * e < D) ? s[2 * e] : 0u;
      const uint32_t hi = (row_ok && e0 + 2 * e + 1 < D) ? s[2 * e + 1] : 0u;
      w[e] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(dst_row + e0) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Loader geometry for copy width W: a shared row is kPerRow pieces; thread i loads piece i % kPerRow of
// rows i / kPerRow, + kRowStep, ... (threads from kRowStep * kPerRow on, if any, load nothing). The
// loops are not unrolled: a W = 4 tile is up to 64 pieces per thread, and unrolled they would hold
// their addresses in registers that the key loop needs.
template <typename S, int W>
struct Pieces {
  static constexpr int kPerRow = S::kDPad / kPieceElems<W>;
  static constexpr int kRowStep = S::kThreads / kPerRow;
  static constexpr int kThreads = kRowStep * kPerRow;
  static_assert(kRowStep >= 1, "one row per pass at least");
};

// The Q tile: rows [0, rows) from q_rows (row pitch q_sl), zero rows up to kBlockM.
template <typename T, typename S, int W>
__device__ __forceinline__ void load_q_tile(T* dst, const T* q_rows, int64_t q_sl, int rows, int D, int shift,
                                            const T* dummy) {
  using P = Pieces<S, W>;
  if (threadIdx.x >= P::kThreads) return;
  const int c = threadIdx.x % P::kPerRow;
#pragma unroll 1
  for (int r = threadIdx.x / P::kPerRow; r < S::kBlockM; r += P::kRowStep) {
    load_piece<W>(dst + r * S::kLd, q_rows + r * q_sl, r < rows, c, shift, D, dummy);
  }
}

// The rows one block reads and writes. Key rows come from the joined range [0, Lc + Ls) ("virtual
// concatenation"): key j < Lc is row j of the context segment, key j >= Lc row j - Lc of the self segment,
// each through its own strides.
template <typename T>
struct BlockRows {
  const T* k0;  // context K, V at (b, h)
  const T* v0;
  const T* k1;  // self K, V at (b, h)
  const T* v1;
  int64_t k0_sl, v0_sl, k1_sl, v1_sl;
  int64_t len0;   // Lc
  int64_t total;  // Lc + Ls
  const T* dummy;  // a copy-width aligned address (Q row 0's first piece) for copies that read nothing
  int k_shift;     // column shifts of K (= Q's) and V
  int v_shift;
  T* out;          // the block's first output row and lse entry (for the epilogue)
  float* lse;
};

// K and V rows [n0, n0 + kBlockN) of the joined range into one pipeline stage; rows >= total are zero
// (so that masked probabilities never meet non-finite V values). Tile row r is row n0 + r of the context
// segment when n0 + r < Lc, else row n0 + r - Lc of the self segment.
template <typename T, typename S, int W>
__device__ __forceinline__ void load_kv_tile(T* ks, T* vs, const BlockRows<T>& src, int64_t n0, int D) {
  const int64_t ctx_left = src.len0 - n0;
  const int64_t all_left = src.total - n0;
  const int ctx_rows = static_cast<int>(ctx_left < 0 ? 0 : (ctx_left < kBlockN ? ctx_left : kBlockN));
  const int valid_rows = static_cast<int>(all_left < kBlockN ? all_left : kBlockN);  // >= 1
  // Row 0 of the tile in each segment's coordinates (outside the segment when the tile does not reach
  // it; such rows are never read).
  const T* const k0 = src.k0 + n0 * src.k0_sl;
  const T* const v0 = src.v0 + n0 * src.v0_sl;
  const T* const k1 = src.k1 + (n0 - src.len0) * src.k1_sl;
  const T* const v1 = src.v1 + (n0 - src.len0) * src.v1_sl;
  using P = Pieces<S, W>;
  if (threadIdx.x >= P::kThreads) return;
  const int c = threadIdx.x % P::kPerRow;
#pragma unroll 1
  for (int r = threadIdx.x / P::kPerRow; r < kBlockN; r += P::kRowStep) {
    const bool ctx = r < ctx_rows;
    const bool ok = r < valid_rows;
    load_piece<W>(ks + r * S::kLd, ctx ? k0 + r * src.k0_sl : k1 + r * src.k1_sl, ok, c, src.k_shift, D, src.dummy);
    load_piece<W>(vs + r * S::kLd, ctx ? v0 + r * src.v0_sl : v1 + r * src.v1_sl, ok, c, src.v_shift, D, src.dummy);
  }
}

// Stores n_rows rows of D elements from shared memory (element e of row r at stage[r * stage_ld + e]) to
// out (row pitch out_ld) with the 32 lanes of a warp: W-byte stores for the W-aligned run of each row,
// 2-byte stores for the elements before and after it. Needs out_ld * 2 a multiple of W (n_rows > 1) and
// out and stage at the same offset modulo W.
template <int W, typename T>
__device__ __forceinline__ void store_rows(T* out, int64_t out_ld, const T* stage, int stage_ld, int n_rows, int D,
                                           int lane) {
  using V = typename rows::Chunk<W>::type;
  constexpr int E = W / 2;
  const int lead = static_cast<int>((E - (reinterpret_cast<uintptr_t>(out) / 2) % E) % E);
  const int head = lead < D ? lead : D;  // elements before the first W-aligned one
  const int body = (D - head) / E;        // W-byte stores
  const int per_row = D - body * (E - 1);  // head + body + tail
  for (int i = lane; i < n_rows * per_row; i += 32) {
    const int r = i / per_row;
    const int k = i - r * per_row;
    T* const o = out + r * out_ld;
    const T* const s = stage + r * stage_ld;
    if (k >= head && k < head + body) {
      const int e = head + (k - head) * E;
      *reinterpret_cast<V*>(o + e) = *reinterpret_cast<const V*>(s + e);
    } else {
      const int e = k < head ? k : k + body * (E - 1);
      o[e] = s[e];
    }
  }
}

// Grid: one block per (b, h, kBlockM-row query block), flattened as bh * num_m_blocks + m_block (fewer
// than 2^31 blocks, so 32-bit divisions find them). copy_width: plan_tc's width, the same for every
// block; each block derives its column shifts from its own addresses.
template <typename T, int D_PAD, int WARPS>
__global__ void __launch_bounds__(TcShape<D_PAD, WARPS>::kThreads, TcShape<D_PAD, WARPS>::kMinBlocks)
    attn_tc_kernel(const AttnParams<T> p, int num_m_blocks, int copy_width) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using S = TcShape<D_PAD, WARPS>;
  constexpr int kKSteps = D_PAD / 16;   // k-steps of S = Q K^T (16 columns of D each)
  constexpr int kSTiles = kBlockN / 8;  // n-tiles of S (8 keys each)
  constexpr int kOTiles = D_PAD / 8;    // n-tiles of O (8 columns each)

  extern __shared__ __align__(128) unsigned char smem[];
  T* const q_smem = reinterpret_cast<T*>(smem);
  T* const kv_smem = q_smem + S::kQElems;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2;   // mma fragment row group
  const int tg = lane & 3;   // thread in group
  const int blk = static_cast<int>(blockIdx.x);
  const int bh = blk / num_m_blocks;
  const int64_t m0 = static_cast<int64_t>(blk - bh * num_m_blocks) * S::kBlockM;
  const int H = static_cast<int>(p.H);
  const int64_t b = bh / H;
  const int64_t h = bh - b * H;
  const int rows_q = static_cast<int>(p.Lq - m0 < S::kBlockM ? p.Lq - m0 : S::kBlockM);
  const int D = p.D;

  // Where this block's K/V rows come from and its output goes, and the column shifts (see the loader in the
  // header comment): elements between the copy-width boundary and a row's start, one for Q and K (plan_tc
  // saw to it), one for V. The prologue uses the registers, the key loop and the epilogue the shared copy
  // (so that the loop does not hold them in registers).
  __shared__ BlockRows<T> shared_src;
  const T* const q_rows = p.q + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2];
  const uintptr_t w_mask = (copy_width > 2 ? static_cast<uintptr_t>(copy_width) : 2) - 1;  // widths: powers of 2
  BlockRows<T> src;
  src.k0 = p.k[0] + b * p.k_stride[0][0] + h * p.k_stride[0][1];
  src.v0 = p.v[0] + b * p.v_stride[0][0] + h * p.v_stride[0][1];
  src.k1 = p.k[1] + b * p.k_stride[1][0] + h * p.k_stride[1][1];
  src.v1 = p.v[1] + b * p.v_stride[1][0] + h * p.v_stride[1][1];
  src.k0_sl = p.k_stride[0][2];
  src.v0_sl = p.v_stride[0][2];
  src.k1_sl = p.k_stride[1][2];
  src.v1_sl = p.v_stride[1][2];
  src.len0 = p.len[0];
  src.total = p.len[0] + p.len[1];
  src.k_shift = static_cast<int>(reinterpret_cast<uintptr_t>(q_rows) & w_mask) / 2;
  src.v_shift = static_cast<int>(reinterpret_cast<uintptr_t>(src.len0 > 0 ? src.v0 : src.v1) & w_mask) / 2;
  src.dummy = q_rows - src.k_shift;
  src.out = p.out + b * p.out_stride[0] + h * p.out_stride[1] + m0 * p.out_stride[2];
  src.lse = p.lse + static_cast<int64_t>(bh) * p.Lq + m0;  // lse is (B, H, Lq)
  if (threadIdx.x == 0) shared_src = src;
  const int n_tiles = static_cast<int>((src.total + kBlockN - 1) / kBlockN);  // >= 1

  // Stage `tile` of the pipeline (after the prologue: read shared_src after a __syncthreads).
  auto load_stage = [&](int tile, const BlockRows<T>& from) {
    T* const ks = kv_smem + (tile % kStages) * S::kStageElems;
    with_copy_width(copy_width, [&](auto w) {
      load_kv_tile<T, S, decltype(w)::value>(ks, ks + S::kTileElems, from, int64_t(tile) * kBlockN, D);
    });
  };

  // Prologue: Q and the first kStages - 1 K/V tiles, one commit group per tile (Q rides with tile 0).
  with_copy_width(copy_width, [&](auto w) {
    load_q_tile<T, S, decltype(w)::value>(q_smem, q_rows, p.q_stride[2], rows_q, D, src.k_shift, src.dummy);
  });
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_stage(s, src);
    cp_async_commit();
  }
  cp_async_wait<kStages - 2>();
  __syncthreads();

  // Columns [0, k_shift) of Q and K hold the elements before a row's start: each lane zeroes them in its
  // fragments, whose registers 0 and 1 (Q) or 0 and 2 (K) hold columns 2tg (low half) and 2tg + 1 (high
  // half) of the first k-step (k_shift <= 7).
  const int k_shift = src.k_shift;
  const uint32_t keep = (2 * tg >= k_shift ? 0x0000ffffu : 0u) | (2 * tg + 1 >= k_shift ? 0xffff0000u : 0u);

  // This warp's 16 query rows as mma A fragments, kept in registers for the whole key loop. Lane i
  // addresses row i % 16, column half i / 16 of each 16x16 block: matrices (rows 0-7 | 8-15) x
  // (columns 0-7 | 8-15) land in registers 0..3 as the m16n8k16 A layout wants.
  uint32_t qf[kKSteps][4];
  {
    const T* const base = q_smem + (warp * 16 + (lane & 15)) * S::kLd + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) ldmatrix_x4(qf[kk], smem_addr(base + kk * 16));
  }
  // exp2(s * scale_log2 - m) with the row max taken over raw scores needs scale_log2 >= 0: a negative
  // scale is moved onto Q (sign flips are exact).
  if (p.scale_log2 < 0.f) {
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) qf[kk][i] ^= 0x80008000u;
    }
  }
  qf[0][0] &= keep;
  qf[0][1] &= keep;

  // Warps whose 16 rows are all >= Lq only help load.
  const bool active = warp * 16 < rows_q;
  // Accumulator fragments: o[j] holds O rows g (elements 0, 1) and g + 8 (2, 3), columns 8j + 2tg + {0, 1}.
  float o[kOTiles][4];
#pragma unroll
  for (int j = 0; j < kOTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g, g + 8: running max of scaled scores (log2 domain)
  float row_sum[2] = {0.f, 0.f};              // this lane's share of the running sum of exp2(score - max)

  // Per-lane ldmatrix offsets (elements). K (non-transposed, B of Q K^T): matrices (keys 0-7 | 8-15) x
  // (d 0-7 | 8-15) ordered (k0 d0, k0 d8, k8 d0, k8 d8): registers {0, 1} are the b fragment of the first
  // 8 keys, {2, 3} of the next 8. V (transposed, B of P V): matrices ordered (k0 d0, k8 d0, k0 d8, k8 d8):
  // registers {0, 1} are the b fragment of columns 0-7, {2, 3} of columns 8-15.
  const int k_off = ((lane & 7) + ((lane >> 4) << 3)) * S::kLd + ((lane >> 3) & 1) * 8;
  const int v_off = ((lane & 7) + (((lane >> 3) & 1) << 3)) * S::kLd + (lane >> 4) * 8;

  const float scale_log2 = fabsf(p.scale_log2);

#pragma unroll 1
  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait<kStages - 2>();  // tile t has landed (this thread's part) ...
    __syncthreads();               // ... everyone's, and every warp is done with tile t - 1
    {
      const int next = t + kStages - 1;
      if (next < n_tiles) load_stage(next, shared_src);  // into the stage tile t - 1 used
      cp_async_commit();
    }
    if (!active) continue;

    const T* const ks = kv_smem + (t % kStages) * S::kStageElems;
    const T* const vs = ks + S::kTileElems;
    const uint32_t k_base = smem_addr(ks + k_off);
    const uint32_t v_base = smem_addr(vs + v_off);

    // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
    float s[kSTiles][4];
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int jp = 0; jp < kSTiles / 2; ++jp) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_base + (jp * 16 * S::kLd + kk * 16) * 2);
        if (kk == 0) {
          kb[0] &= keep;
          kb[2] &= keep;
        }
        Mma<T>::run(s[2 * jp], qf[kk], kb[0], kb[1]);
        Mma<T>::run(s[2 * jp + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // Online softmax. Only the last tile can reach past the joined key range.
    const int64_t n0 = int64_t(t) * kBlockN;
    const int64_t total = p.len[0] + p.len[1];
    const bool ragged = n0 + kBlockN > total;
    const int limit = static_cast<int>(total - n0);  // valid keys in this tile when ragged
    if (ragged) {
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (j * 8 + 2 * tg + (e & 1) >= limit) s[j][e] = -INFINITY;
        }
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
    }
    float m_new[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad share rows g and g + 8
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      m_new[r] = fmaxf(row_max[r], mx[r] * scale_log2);  // finite: every tile has a valid key
      alpha[r] = exp2f(row_max[r] - m_new[r]);           // 0 on the first tile
      row_max[r] = m_new[r];
    }
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = exp2f(fmaf(s[j][e], scale_log2, -m_new[e >> 1]));
    }
    if (ragged) {  // exact zeros even when scale is 0
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (j * 8 + 2 * tg + (e & 1) >= limit) s[j][e] = 0.f;
        }
      }
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
      sum[0] += s[j][0] + s[j][1];
      sum[1] += s[j][2] + s[j][3];
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * alpha[r] + sum[r];
#pragma unroll
    for (int j = 0; j < kOTiles; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }

    // O += P V. The S accumulators of key tiles 2kk and 2kk + 1, rounded to T, are exactly the A fragment
    // of keys [16kk, 16kk + 16): (row g, keys 2tg..), (row g + 8, ..), (row g, keys 8 + 2tg..), (row g + 8, ..).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D_PAD / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4<true>(vb, v_base + (kk * 16 * S::kLd + dp * 16) * 2);
        Mma<T>::run(o[2 * dp], pa, vb[0], vb[1]);
        Mma<T>::run(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
  }

  // Epilogue (active warps): quad sums, lse, then O / l as T staged in this warp's own rows of the Q tile,
  // column j holding element j - V's shift, and stored from there. Rows >= Lq and columns >= D are never
  // written.
  if (!active) return;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = 1.f / l;
    const int row = warp * 16 + g + 8 * r;
    if (tg == 0 && row < rows_q) shared_src.lse[row] = (row_max[r] + log2f(l)) * kLn2;
  }
  T* const stage = q_smem + warp * 16 * S::kLd;
#pragma unroll
  for (int j = 0; j < kOTiles; ++j) {
    const int c = j * 8 + 2 * tg;
    *reinterpret_cast<uint32_t*>(stage + g * S::kLd + c) = Mma<T>::pack(o[j][0] * inv[0], o[j][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(stage + (g + 8) * S::kLd + c) = Mma<T>::pack(o[j][2] * inv[1], o[j][3] * inv[1]);
  }
  __syncwarp();
  const int rows_w = rows_q - warp * 16 < 16 ? rows_q - warp * 16 : 16;
  const int64_t out_ld = p.out_stride[2];
  T* const out = shared_src.out + warp * 16 * out_ld;
  const T* const staged = stage + shared_src.v_shift;
  // The widest store that the row pitch and the offset between the output and staged rows allow.
  int w = 16;
  while (w > 2 && ((rows_w > 1 && (out_ld * 2) % w != 0) ||
                   (reinterpret_cast<uintptr_t>(out) - reinterpret_cast<uintptr_t>(staged)) % w != 0)) {
    w /= 2;
  }
  switch (w) {
    case 16: store_rows<16>(out, out_ld, staged, S::kLd, rows_w, D, lane); break;
    case 8: store_rows<8>(out, out_ld, staged, S::kLd, rows_w, D, lane); break;
    case 4: store_rows<4>(out, out_ld, staged, S::kLd, rows_w, D, lane); break;
    default: store_rows<2>(out, out_ld, staged, S::kLd, rows_w, D, lane); break;
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // the host only launches this kernel on compute capability >= 8.0
#endif
}

// ---------------------------------------------------------------------------------------------------
// Simple path: one warp per query row.

constexpr int kSimpleWarps = 4;
constexpr int kSimpleThreads = kSimpleWarps * 32;
constexpr int kPerLane = kMaxHeadDim / 32;

template <typename T>
__global__ void __launch_bounds__(kSimpleThreads) attn_simple_kernel(const AttnParams<T> p) {
  const int lane = threadIdx.x % 32;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kSimpleWarps + threadIdx.x / 32;  // bh * Lq + row
  if (idx >= p.rows) return;  // whole warp
  const int64_t bh = idx / p.Lq;
  const int64_t row = idx - bh * p.Lq;
  const int64_t b = bh / p.H;
  const int64_t h = bh - b * p.H;
  const int D = p.D;

  const T* const q_row = p.q + b * p.q_stride[0] + h * p.q_stride[1] + row * p.q_stride[2];
  float qv[kPerLane];
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    qv[i] = c < D ? Cvt<T>::to_float(q_row[c]) * p.scale_log2 : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY;
  float l = 0.f;

#pragma unroll 1
  for (int seg = 0; seg < 2; ++seg) {
    const int64_t len = p.len[seg];
    if (len == 0) continue;
    const T* const kbase = p.k[seg] + b * p.k_stride[seg][0] + h * p.k_stride[seg][1];
    const T* const vbase = p.v[seg] + b * p.v_stride[seg][0] + h * p.v_stride[seg][1];
    const int64_t ksl = p.k_stride[seg][2];
    const int64_t vsl = p.v_stride[seg][2];
    for (int64_t n = 0; n < len; ++n) {
      const T* const k_row = kbase + n * ksl;
      const T* const v_row = vbase + n * vsl;
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < D) s += qv[i] * Cvt<T>::to_float(k_row[c]);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      const float m_new = fmaxf(m, s);
      const float alpha = exp2f(m - m_new);  // 0 for the first key (m = -inf)
      const float e = exp2f(s - m_new);
      l = l * alpha + e;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < D) acc[i] = acc[i] * alpha + e * Cvt<T>::to_float(v_row[c]);
      }
      m = m_new;
    }
  }

  const float inv = 1.f / l;
  T* const out_row = p.out + b * p.out_stride[0] + h * p.out_stride[1] + row * p.out_stride[2];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < D) out_row[c] = Cvt<T>::from_float(acc[i] * inv);
  }
  if (lane == 0) p.lse[idx] = m * kLn2 + logf(l);
}

}  // namespace attention
}  // namespace enat
