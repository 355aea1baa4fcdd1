// asymmetric_attention_cuda: out = softmax(q @ [k_ctx ; k_self]^T * scale) @ [v_ctx ; v_self], plus the
// natural-log log-sum-exp of the scaled scores, without concatenating the two key segments.
//
// Design. One online softmax (running max m and sum l in the log2 domain, fp32 accumulation) walks the
// joined key range [0, Lc + Ls) ("virtual concatenation": each key row is read from whichever segment holds
// it, through that segment's own (b, h, l) strides with 64-bit offsets; a tile may straddle the boundary;
// an empty segment simply contributes no rows). The last dimension must be contiguous.
//  * Tensor-core path (fp16/bf16, compute capability >= 8.0), FlashAttention-2 style:
//    attn_tc_kernel<T, D_PAD, WARPS>, D_PAD = D rounded up to 32, 64 or 128 (padded columns are zero in
//    shared memory, so they change no dot product). Each warp owns 16 query rows; WARPS = 4 (64-row blocks)
//    or, for D_PAD = 64 and Lq > 64, 8 (128-row blocks); key tiles of 64. Q is loaded once and kept in
//    registers as mma A fragments (ldmatrix). K/V tiles go through a 2-stage shared-memory pipeline of
//    16-byte cp.async copies (zero-filled past the key range and past D) when every input allows it
//    (D % 8 == 0, 16-byte aligned bases, strides multiples of 8 elements), else through a synchronous
//    element-wise loader into the same buffers. Per tile: S = Q K^T with mma.sync m16n8k16 (K through
//    ldmatrix), keys >= Lc + Ls masked on the last tile only, row max / sum across the 4 lanes of a quad,
//    P = exp2(S * scale * log2(e) - m) as one FMA, O rescaled in registers, P rounded to T and used in
//    registers as the A operand of O += P V (V through ldmatrix.trans). Shared rows are padded by 16
//    bytes so ldmatrix is free of bank conflicts. Epilogue: lse = (m + log2 l) * ln 2; O / l staged as T
//    in the warp's rows of the Q tile and written with 16-byte stores (element-wise when D % 8 != 0);
//    rows >= Lq and columns >= D are never written.
//  * Simple path (fp32 on any GPU, fp16/bf16 below sm_80, or too little shared memory): one warp per
//    query row, lanes split D (up to 4 columns each), one warp-shuffle dot product and scalar online
//    softmax step per key, 4 rows per block.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../check.h"
#include "../enat_kernels.h"

namespace enat {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxHeadDim = 128;

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
// Strides are in elements, ordered (b, h, l). out is (B, H, Lq, D) contiguous, lse (B, H, Lq) contiguous.
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
  static constexpr int kThreads = WARPS * 32;
  static constexpr int kBlockM = WARPS * 16;
  static constexpr int kLd = D_PAD + 8;                    // row pitch, elements
  static constexpr int kChunks = D_PAD / 8;                // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunks;  // rows one pass of the block-wide loader covers
  static constexpr int kTileElems = kBlockN * kLd;
  static constexpr int kStageElems = 2 * kTileElems;       // K tile, then V tile
  static constexpr int kQElems = kBlockM * kLd;
  static constexpr size_t kBytes = size_t(kQElems + kStages * kStageElems) * 2;
  // Up to 128 registers per thread for D_PAD <= 64 (4 blocks of 4 warps or 2 of 8 per SM), 255 above.
  static constexpr int kMinBlocks = D_PAD <= 64 ? 512 / kThreads : 1;

  static_assert(D_PAD % 16 == 0 && D_PAD <= kMaxHeadDim, "D_PAD");
  static_assert(kThreads % kChunks == 0 && kBlockN % kRowsPerPass == 0 && kBlockM % kRowsPerPass == 0,
                "loader passes must tile the Q and K/V tiles");
  static_assert((kLd * 2) % 16 == 0 && ((kLd * 2) / 16) % 2 == 1, "row pitch: 16-byte aligned, odd chunks");
};

// PTX wrappers. Shared-memory operands are 32-bit shared-window addresses.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
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

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// The same with each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// d += a (16x16, row-major fragment) * b (16x8, column-major fragment), fp32 accumulation.
template <typename T> struct Mma;
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  // Two floats as one register of two elements, lo in the low half.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
};
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
};

// One 16-byte chunk (elements [c, c + 8) of a row) into shared memory, zero where the row is out of
// range or the column is >= D. VEC: cp.async (D % 8 == 0, so a chunk is all in or all out; `dummy` is a
// valid 16-byte aligned address for the zero-fill case). Otherwise element-wise loads and one 16-byte
// shared store.
template <typename T, bool VEC>
__device__ __forceinline__ void load_chunk(T* dst, const T* row, bool row_ok, int c, int D, const T* dummy) {
  if constexpr (VEC) {
    const bool ok = row_ok && c < D;
    cp_async_16(smem_addr(dst), ok ? static_cast<const void*>(row + c) : static_cast<const void*>(dummy),
                ok ? 16 : 0);
  } else {
    const uint16_t* const s = reinterpret_cast<const uint16_t*>(row) + c;
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t lo = (row_ok && c + 2 * e < D) ? s[2 * e] : 0u;
      const uint32_t hi = (row_ok && c + 2 * e + 1 < D) ? s[2 * e + 1] : 0u;
      w[e] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// The Q tile: rows [0, rows) from q_rows (row pitch q_sl), zero rows up to kBlockM.
template <typename T, int D_PAD, int WARPS, bool VEC>
__device__ __forceinline__ void load_q_tile(T* dst, const T* q_rows, int64_t q_sl, int rows, int D,
                                            const T* dummy) {
  using S = TcShape<D_PAD, WARPS>;
  const int c = (threadIdx.x % S::kChunks) * 8;
#pragma unroll
  for (int r = threadIdx.x / S::kChunks; r < S::kBlockM; r += S::kRowsPerPass) {
    load_chunk<T, VEC>(dst + r * S::kLd + c, q_rows + r * q_sl, r < rows, c, D, dummy);
  }
}

// Where key rows come from: the joined range [0, Lc + Ls) ("virtual concatenation"); key j < Lc is row j
// of the context segment, key j >= Lc row j - Lc of the self segment, each through its own strides.
template <typename T>
struct KvSource {
  const T* k0;  // context K, V at (b, h)
  const T* v0;
  const T* k1;  // self K, V at (b, h)
  const T* v1;
  int64_t k0_sl, v0_sl, k1_sl, v1_sl;
  int64_t len0;   // Lc
  int64_t total;  // Lc + Ls
};

// K and V rows [n0, n0 + kBlockN) of the joined range into one pipeline stage; rows >= total are zero
// (so that masked probabilities never meet non-finite V values). Tile row r is row n0 + r of the context
// segment when n0 + r < Lc, else row n0 + r - Lc of the self segment.
template <typename T, int D_PAD, int WARPS, bool VEC>
__device__ __forceinline__ void load_kv_tile(T* ks, T* vs, const KvSource<T>& src, int64_t n0, int D,
                                             const T* dummy) {
  using S = TcShape<D_PAD, WARPS>;
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
  const int c = (threadIdx.x % S::kChunks) * 8;
#pragma unroll
  for (int r = threadIdx.x / S::kChunks; r < kBlockN; r += S::kRowsPerPass) {
    const bool ctx = r < ctx_rows;
    const bool ok = r < valid_rows;
    load_chunk<T, VEC>(ks + r * S::kLd + c, ctx ? k0 + r * src.k0_sl : k1 + r * src.k1_sl, ok, c, D, dummy);
    load_chunk<T, VEC>(vs + r * S::kLd + c, ctx ? v0 + r * src.v0_sl : v1 + r * src.v1_sl, ok, c, D, dummy);
  }
}

// Grid: one block per (b, h, kBlockM-row query block), flattened as bh * num_m_blocks + m_block.
// vec: all inputs allow 16-byte cp.async (see can_vectorize); otherwise the synchronous loader.
template <typename T, int D_PAD, int WARPS>
__global__ void __launch_bounds__(TcShape<D_PAD, WARPS>::kThreads, TcShape<D_PAD, WARPS>::kMinBlocks)
    attn_tc_kernel(const AttnParams<T> p, int64_t num_m_blocks, bool vec) {
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
  const int64_t blk = blockIdx.x;
  const int64_t bh = blk / num_m_blocks;
  const int64_t m0 = (blk - bh * num_m_blocks) * S::kBlockM;
  const int64_t b = bh / p.H;
  const int64_t h = bh - b * p.H;
  const int rows_q = static_cast<int>(p.Lq - m0 < S::kBlockM ? p.Lq - m0 : S::kBlockM);
  const int D = p.D;
  const int64_t row0 = bh * p.Lq + m0;  // first output / lse row of the block
  const T* const dummy = p.q;

  KvSource<T> src;
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
  const int n_tiles = static_cast<int>((src.total + kBlockN - 1) / kBlockN);  // >= 1

  auto load_stage = [&](int tile) {
    T* const ks = kv_smem + (tile % kStages) * S::kStageElems;
    if (vec) {
      load_kv_tile<T, D_PAD, WARPS, true>(ks, ks + S::kTileElems, src, int64_t(tile) * kBlockN, D, dummy);
    } else {
      load_kv_tile<T, D_PAD, WARPS, false>(ks, ks + S::kTileElems, src, int64_t(tile) * kBlockN, D, dummy);
    }
  };

  // Prologue: Q and the first kStages - 1 K/V tiles, one commit group per tile (Q rides with tile 0).
  {
    const T* const q_rows = p.q + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2];
    if (vec) {
      load_q_tile<T, D_PAD, WARPS, true>(q_smem, q_rows, p.q_stride[2], rows_q, D, dummy);
    } else {
      load_q_tile<T, D_PAD, WARPS, false>(q_smem, q_rows, p.q_stride[2], rows_q, D, dummy);
    }
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < n_tiles) load_stage(s);
      cp_async_commit();
    }
  }
  cp_async_wait<kStages - 2>();
  __syncthreads();

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
      if (next < n_tiles) load_stage(next);  // into the stage tile t - 1 used
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
        Mma<T>::run(s[2 * jp], qf[kk], kb[0], kb[1]);
        Mma<T>::run(s[2 * jp + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // Online softmax. Only the last tile can reach past the joined key range.
    const int64_t n0 = int64_t(t) * kBlockN;
    const bool ragged = n0 + kBlockN > src.total;
    const int limit = static_cast<int>(src.total - n0);  // valid keys in this tile when ragged
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
        ldmatrix_x4_trans(vb, v_base + (kk * 16 * S::kLd + dp * 16) * 2);
        Mma<T>::run(o[2 * dp], pa, vb[0], vb[1]);
        Mma<T>::run(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
  }

  // Epilogue (active warps): quad sums, lse, then O / l as T staged in this warp's own rows of the Q tile
  // (read only by this warp, long ago) and written with 16-byte stores when D % 8 == 0. Rows >= Lq and
  // columns >= D are never written.
  if (!active) return;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = 1.f / l;
    const int row = warp * 16 + g + 8 * r;
    if (tg == 0 && row < rows_q) p.lse[row0 + row] = (row_max[r] + log2f(l)) * kLn2;
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
  T* const out = p.out + (row0 + warp * 16) * D;  // rows_w contiguous rows of D elements
  if (D % 8 == 0) {
    const int chunks = D / 8;
    for (int i = lane; i < rows_w * chunks; i += 32) {
      const int r = i / chunks;
      const int c = (i - r * chunks) * 8;
      *reinterpret_cast<uint4*>(out + r * D + c) = *reinterpret_cast<const uint4*>(stage + r * S::kLd + c);
    }
  } else {
    for (int i = lane; i < rows_w * D; i += 32) {
      const int r = i / D;
      out[i] = stage[r * S::kLd + (i - r * D)];
    }
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
  T* const out_row = p.out + idx * D;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < D) out_row[c] = Cvt<T>::from_float(acc[i] * inv);
  }
  if (lane == 0) p.lse[idx] = m * kLn2 + logf(l);
}

// ---------------------------------------------------------------------------------------------------
// Host side.

template <typename T>
AttnParams<T> make_params(const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx,
                          const at::Tensor& k_self, const at::Tensor& v_self, at::Tensor& out, at::Tensor& lse,
                          double scale) {
  AttnParams<T> p{};
  p.q = static_cast<const T*>(q.const_data_ptr());
  p.k[0] = static_cast<const T*>(k_ctx.const_data_ptr());
  p.v[0] = static_cast<const T*>(v_ctx.const_data_ptr());
  p.k[1] = static_cast<const T*>(k_self.const_data_ptr());
  p.v[1] = static_cast<const T*>(v_self.const_data_ptr());
  p.out = static_cast<T*>(out.mutable_data_ptr());
  p.lse = lse.mutable_data_ptr<float>();
  const at::Tensor* ks[2] = {&k_ctx, &k_self};
  const at::Tensor* vs[2] = {&v_ctx, &v_self};
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q.stride(d);
    for (int s = 0; s < 2; ++s) {
      p.k_stride[s][d] = ks[s]->stride(d);
      p.v_stride[s][d] = vs[s]->stride(d);
    }
  }
  p.len[0] = k_ctx.size(2);
  p.len[1] = k_self.size(2);
  p.H = q.size(1);
  p.Lq = q.size(2);
  p.rows = q.size(0) * q.size(1) * q.size(2);
  p.D = static_cast<int>(q.size(3));
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  return p;
}

// 16-byte chunks are legal when D % 8 == 0 and every (non-empty) input has a 16-byte aligned base and
// (b, h, l) strides that are multiples of 8 elements (2-byte dtypes only).
bool can_vectorize(const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx, const at::Tensor& k_self,
                   const at::Tensor& v_self) {
  if (q.element_size() != 2 || q.size(3) % 8 != 0) return false;
  auto ok = [](const at::Tensor& t) {
    if (t.numel() == 0) return true;
    if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
    for (int d = 0; d < 3; ++d) {
      if (t.stride(d) % 8 != 0) return false;
    }
    return true;
  };
  return ok(q) && ok(k_ctx) && ok(v_ctx) && ok(k_self) && ok(v_self);
}

template <typename T, int D_PAD, int WARPS>
bool launch_tc(const AttnParams<T>& p, int64_t B, bool vec, const cudaDeviceProp& props) {
  using S = TcShape<D_PAD, WARPS>;
  const size_t smem = S::kBytes;
  if (smem > props.sharedMemPerBlockOptin) return false;
  const int64_t num_m_blocks = (p.Lq + S::kBlockM - 1) / S::kBlockM;
  const int64_t blocks = B * p.H * num_m_blocks;
  ENAT_CHECK_VALUE(blocks <= INT32_MAX, "asymmetric_attention_cuda: too many query blocks (", blocks, ")");
  auto kernel = attn_tc_kernel<T, D_PAD, WARPS>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), S::kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p, num_m_blocks,
                                                                                                vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
void launch_simple(const AttnParams<T>& p) {
  const int64_t blocks = (p.rows + kSimpleWarps - 1) / kSimpleWarps;
  ENAT_CHECK_VALUE(blocks <= INT32_MAX, "asymmetric_attention_cuda: too many query rows (", p.rows, ")");
  attn_simple_kernel<T><<<static_cast<unsigned>(blocks), kSimpleThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx, const at::Tensor& k_self,
         const at::Tensor& v_self, at::Tensor& out, at::Tensor& lse, double scale, bool tensor_cores) {
  const AttnParams<T> p = make_params<T>(q, k_ctx, v_ctx, k_self, v_self, out, lse, scale);
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      const cudaDeviceProp& props = *at::cuda::getCurrentDeviceProperties();
      const bool vec = can_vectorize(q, k_ctx, v_ctx, k_self, v_self);
      const int64_t B = q.size(0);
      bool launched;
      if (p.D <= 32) {
        launched = launch_tc<T, 32, 4>(p, B, vec, props);
      } else if (p.D <= 64) {
        // 128-row blocks halve the K/V traffic per query row; short queries keep 64-row blocks.
        launched = p.Lq > 64 ? launch_tc<T, 64, 8>(p, B, vec, props) : launch_tc<T, 64, 4>(p, B, vec, props);
      } else {
        launched = launch_tc<T, 128, 4>(p, B, vec, props);
      }
      if (launched) return;
    }
  }
  launch_simple<T>(p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> asymmetric_attention_cuda(const at::Tensor& q, const at::Tensor& k_ctx,
                                                             const at::Tensor& v_ctx, const at::Tensor& k_self,
                                                             const at::Tensor& v_self, double scale) {
  ENAT_CHECK_CUDA("q", q);
  ENAT_CHECK_CUDA("k_ctx", k_ctx);
  ENAT_CHECK_CUDA("v_ctx", v_ctx);
  ENAT_CHECK_CUDA("k_self", k_self);
  ENAT_CHECK_CUDA("v_self", v_self);
  ENAT_CHECK_DIM("q", q, 4);
  ENAT_CHECK_DIM("k_ctx", k_ctx, 4);
  ENAT_CHECK_DIM("v_ctx", v_ctx, 4);
  ENAT_CHECK_DIM("k_self", k_self, 4);
  ENAT_CHECK_DIM("v_self", v_self, 4);
  const auto dtype = q.scalar_type();
  ENAT_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
                  "q must be float16, bfloat16 or float32, got ", ::enat::describe(q));
  ENAT_CHECK_DTYPE("k_ctx", k_ctx, dtype);
  ENAT_CHECK_DTYPE("v_ctx", v_ctx, dtype);
  ENAT_CHECK_DTYPE("k_self", k_self, dtype);
  ENAT_CHECK_DTYPE("v_self", v_self, dtype);
  ENAT_CHECK_SAME_DEVICE("q", q, "k_ctx", k_ctx);
  ENAT_CHECK_SAME_DEVICE("q", q, "v_ctx", v_ctx);
  ENAT_CHECK_SAME_DEVICE("q", q, "k_self", k_self);
  ENAT_CHECK_SAME_DEVICE("q", q, "v_self", v_self);
  for (int d : {0, 1, 3}) {  // B, H, D
    ENAT_CHECK_SIZE("k_ctx", k_ctx, d, "q", q, d);
    ENAT_CHECK_SIZE("v_ctx", v_ctx, d, "q", q, d);
    ENAT_CHECK_SIZE("k_self", k_self, d, "q", q, d);
    ENAT_CHECK_SIZE("v_self", v_self, d, "q", q, d);
  }
  ENAT_CHECK_SIZE("v_ctx", v_ctx, 2, "k_ctx", k_ctx, 2);
  ENAT_CHECK_SIZE("v_self", v_self, 2, "k_self", k_self, 2);
  ENAT_CHECK_LAST_DIM_CONTIGUOUS("q", q);
  ENAT_CHECK_LAST_DIM_CONTIGUOUS("k_ctx", k_ctx);
  ENAT_CHECK_LAST_DIM_CONTIGUOUS("v_ctx", v_ctx);
  ENAT_CHECK_LAST_DIM_CONTIGUOUS("k_self", k_self);
  ENAT_CHECK_LAST_DIM_CONTIGUOUS("v_self", v_self);
  ENAT_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "q.shape[3] (head dim) must be in [1, ",
                   kMaxHeadDim, "], got ", ::enat::describe(q));
  ENAT_CHECK_VALUE(k_ctx.size(2) + k_self.size(2) > 0,
                   "k_ctx and k_self are both empty (no keys to attend to), got ", ::enat::describe(k_ctx), " and ",
                   ::enat::describe(k_self));

  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  auto out = at::empty({B, H, Lq, D}, q.options());
  auto lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const bool tensor_cores = at::cuda::getCurrentDeviceProperties()->major >= 8;
  switch (dtype) {
    case at::kHalf: run<__half>(q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, tensor_cores); break;
    case at::kBFloat16: run<__nv_bfloat16>(q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, tensor_cores); break;
    default: run<float>(q, k_ctx, v_ctx, k_self, v_self, out, lse, scale, false); break;
  }
  return {out, lse};
}

TORCH_LIBRARY_IMPL(enat, CUDA, m) { m.impl("asymmetric_attention_cuda", &asymmetric_attention_cuda); }

}  // namespace enat
