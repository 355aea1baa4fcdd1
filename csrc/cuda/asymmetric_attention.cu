// asymmetric_attention_cuda: out = softmax(q @ [k_ctx ; k_self]^T * scale) @ [v_ctx ; v_self], plus the
// natural-log log-sum-exp of the scaled scores, without concatenating the two key segments.
//
// Design. One online softmax (running max m and sum l in the log2 domain, fp32 accumulation) walks the
// context keys and then the self keys; an empty segment is skipped. All inputs are read through their
// own (b, h, l) strides with 64-bit offsets; the last dimension must be contiguous.
//  * Tensor-core path (fp16/bf16, compute capability >= 8.0): attn_tc_kernel<T, D_PAD>, D_PAD = D rounded
//    up to 32, 64 or 128 (padded columns are zero). 4 warps, 64 query rows per block (16 per warp), key
//    tiles of 64. Q is staged in shared memory once and kept in registers as wmma matrix_a fragments.
//    Per key tile: K and V are loaded to shared memory (zero beyond D and beyond the segment length);
//    each warp computes S = Q K^T (16 x 64, wmma, K read as a col_major matrix_b) into its own fp32
//    scratch; two lanes per row (interleaved columns) mask keys >= segment length, update m and l
//    (kept in registers), write P = exp2(S * scale * log2(e) - m) as T and rescale the warp's rows of
//    the fp32 O accumulator (shared memory) by alpha = exp2(m_old - m_new); then O += P V with wmma
//    (accumulator loaded from / stored back to shared memory). Finally out = O / l for rows < Lq and
//    columns < D, lse = m * ln(2) + ln(l). Rows >= Lq hold zero queries (finite, never written).
//  * Simple path (fp32 on any GPU, fp16/bf16 below sm_80, or too little shared memory): one warp per
//    query row, lanes split D (up to 4 columns each), one warp-shuffle dot product and scalar online
//    softmax step per key, 4 rows per block.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cmath>
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
// Tensor-core path.

constexpr int kTcWarps = 4;
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kBlockM = kTcWarps * 16;  // query rows per block, 16 per warp
constexpr int kBlockN = 64;             // keys per tile
static_assert(kBlockM == kBlockN, "Q is staged in the K tile buffer");

// Shared memory layout (byte offsets). Leading dimensions are padded (T: +8 elements = 16 bytes, float:
// +4 = 16 bytes) to spread banks; every wmma pointer stays 32-byte aligned (checked below).
template <typename T, int D_PAD>
struct TcSmem {
  static constexpr int kLdT = D_PAD + 8;     // K, V (and the Q staging) rows, elements of T
  static constexpr int kLdO = D_PAD + 4;     // O accumulator rows, floats
  static constexpr int kLdS = kBlockN + 4;   // per-warp S scratch rows, floats
  static constexpr int kLdP = kBlockN + 8;   // per-warp P rows, elements of T
  static constexpr size_t kTileBytes = size_t(kBlockN) * kLdT * sizeof(T);
  static constexpr size_t kK = 0;
  static constexpr size_t kV = kK + kTileBytes;
  static constexpr size_t kS = kV + kTileBytes;
  static constexpr size_t kP = kS + size_t(kTcWarps) * 16 * kLdS * sizeof(float);
  static constexpr size_t kO = kP + size_t(kTcWarps) * 16 * kLdP * sizeof(T);
  static constexpr size_t kInvL = kO + size_t(kBlockM) * kLdO * sizeof(float);
  static constexpr size_t kBytes = kInvL + size_t(kBlockM) * sizeof(float);

  static_assert(D_PAD % 16 == 0 && D_PAD <= kMaxHeadDim, "D_PAD");
  static_assert(kLdT % 8 == 0 && kLdP % 8 == 0 && kLdO % 4 == 0 && kLdS % 4 == 0, "wmma ldm");
  static_assert((16 * kLdT * sizeof(T)) % 32 == 0 && (16 * kLdO * sizeof(float)) % 32 == 0 &&
                    (16 * kLdS * sizeof(float)) % 32 == 0 && (16 * kLdP * sizeof(T)) % 32 == 0,
                "16-row steps must keep wmma pointers 32-byte aligned");
  static_assert(kV % 128 == 0 && kS % 128 == 0 && kP % 128 == 0 && kO % 128 == 0 && kInvL % 128 == 0,
                "section alignment");
};

// Copies a tile of `rows` rows (row r at src + r * stride_l, D contiguous elements) into dst[kBlockN][ld],
// zero-filling columns [D, D_PAD) and rows [rows, kBlockN). With `vec` (D % 8 == 0, 16-byte aligned base
// and strides, 2-byte T) the copy moves 16-byte chunks.
template <typename T, int D_PAD>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, int ld, const T* __restrict__ src,
                                          int64_t stride_l, int rows, int D, bool vec) {
  if (vec) {
    constexpr int kChunks = D_PAD / 8;
    for (int i = threadIdx.x; i < kBlockN * kChunks; i += kTcThreads) {
      const int r = i / kChunks;
      const int c = (i - r * kChunks) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows && c < D) val = *reinterpret_cast<const uint4*>(src + r * stride_l + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
  } else {
    const T zero = Cvt<T>::from_float(0.f);
    for (int i = threadIdx.x; i < kBlockN * D_PAD; i += kTcThreads) {
      const int r = i / D_PAD;
      const int c = i - r * D_PAD;
      dst[r * ld + c] = (r < rows && c < D) ? src[r * stride_l + c] : zero;
    }
  }
}

// Grid: one block per (b, h, 64-row query block), flattened as bh * num_m_blocks + m_block.
template <typename T, int D_PAD>
__global__ void __launch_bounds__(kTcThreads)
    attn_tc_kernel(const AttnParams<T> p, int64_t num_m_blocks, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using L = TcSmem<T, D_PAD>;
  constexpr int kDTiles = D_PAD / 16;
  constexpr int kNTiles = kBlockN / 16;

  extern __shared__ __align__(128) unsigned char smem[];
  T* const Ks = reinterpret_cast<T*>(smem + L::kK);
  T* const Vs = reinterpret_cast<T*>(smem + L::kV);
  float* const Ss = reinterpret_cast<float*>(smem + L::kS);
  T* const Ps = reinterpret_cast<T*>(smem + L::kP);
  float* const Os = reinterpret_cast<float*>(smem + L::kO);
  float* const inv_l = reinterpret_cast<float*>(smem + L::kInvL);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t blk = blockIdx.x;
  const int64_t bh = blk / num_m_blocks;
  const int64_t m0 = (blk - bh * num_m_blocks) * kBlockM;
  const int64_t b = bh / p.H;
  const int64_t h = bh - b * p.H;
  const int rows_q = static_cast<int>(p.Lq - m0 < kBlockM ? p.Lq - m0 : kBlockM);

  // Stage the Q tile in the K buffer, zero the O accumulator, and keep this warp's 16 rows of Q in
  // registers.
  load_tile<T, D_PAD>(Ks, L::kLdT, p.q + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2],
                      p.q_stride[2], rows_q, p.D, vec);
  for (int i = threadIdx.x; i < kBlockM * L::kLdO; i += kTcThreads) Os[i] = 0.f;
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[kDTiles];
#pragma unroll
  for (int kd = 0; kd < kDTiles; ++kd) {
    wmma::load_matrix_sync(qf[kd], Ks + warp * 16 * L::kLdT + kd * 16, L::kLdT);
  }
  __syncthreads();  // the first key tile overwrites Ks

  float* const Sw = Ss + warp * 16 * L::kLdS;  // this warp's S scratch [16][kLdS]
  T* const Pw = Ps + warp * 16 * L::kLdP;      // this warp's P [16][kLdP]
  float* const Ow = Os + warp * 16 * L::kLdO;  // this warp's O rows [16][kLdO]
  const int srow = lane >> 1;  // softmax: row within the warp's 16 rows
  const int shalf = lane & 1;  // softmax: this lane takes columns shalf, shalf + 2, ...
  float m_i = -INFINITY;       // running max of the scaled scores (log2 domain), same in both lanes
  float l_i = 0.f;             // running sum of exp2(score - m_i), same in both lanes

#pragma unroll 1
  for (int seg = 0; seg < 2; ++seg) {
    const int64_t len = p.len[seg];
    if (len == 0) continue;
    const T* const kbase = p.k[seg] + b * p.k_stride[seg][0] + h * p.k_stride[seg][1];
    const T* const vbase = p.v[seg] + b * p.v_stride[seg][0] + h * p.v_stride[seg][1];
    const int64_t ksl = p.k_stride[seg][2];
    const int64_t vsl = p.v_stride[seg][2];

    for (int64_t n0 = 0; n0 < len; n0 += kBlockN) {
      const int valid = static_cast<int>(len - n0 < kBlockN ? len - n0 : kBlockN);  // >= 1
      load_tile<T, D_PAD>(Ks, L::kLdT, kbase + n0 * ksl, ksl, valid, p.D, vec);
      load_tile<T, D_PAD>(Vs, L::kLdT, vbase + n0 * vsl, vsl, valid, p.D, vec);
      __syncthreads();

      // S[i][j] = sum_d Q[warp*16 + i][d] * K[j][d]. matrix_b (d x key) col_major: element (d, j) at
      // Ks[j * kLdT + d].
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
        wmma::fill_fragment(sf, 0.f);
#pragma unroll
        for (int kd = 0; kd < kDTiles; ++kd) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
          wmma::load_matrix_sync(kf, Ks + nt * 16 * L::kLdT + kd * 16, L::kLdT);
          wmma::mma_sync(sf, qf[kd], kf, sf);
        }
        wmma::store_matrix_sync(Sw + nt * 16, sf, L::kLdS, wmma::mem_row_major);
      }
      __syncwarp();

      // Online softmax on row srow: two lanes per row, combined with a shuffle.
      {
        const float* const s_row = Sw + srow * L::kLdS;
        T* const p_row = Pw + srow * L::kLdP;
        float mx = -INFINITY;
#pragma unroll 8
        for (int i = 0; i < kBlockN / 2; ++i) {
          const int c = 2 * i + shalf;
          if (c < valid) mx = fmaxf(mx, s_row[c] * p.scale_log2);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float m_new = fmaxf(m_i, mx);          // finite: the tile has a valid key
        const float alpha = exp2f(m_i - m_new);      // 0 on the first tile (m_i = -inf)
        float sum = 0.f;
#pragma unroll 8
        for (int i = 0; i < kBlockN / 2; ++i) {
          const int c = 2 * i + shalf;
          const float e = c < valid ? exp2f(s_row[c] * p.scale_log2 - m_new) : 0.f;
          p_row[c] = Cvt<T>::from_float(e);
          sum += e;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l_i = l_i * alpha + sum;
        m_i = m_new;
        float* const o_row = Ow + srow * L::kLdO;
#pragma unroll 8
        for (int i = 0; i < D_PAD / 2; ++i) o_row[2 * i + shalf] *= alpha;
      }
      __syncwarp();

      // O[i][d] += sum_j P[i][j] * V[j][d]. matrix_b (key x d) row_major: element (j, d) at
      // Vs[j * kLdT + d].
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
        wmma::load_matrix_sync(of, Ow + dt * 16, L::kLdO, wmma::mem_row_major);
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
          wmma::load_matrix_sync(pf, Pw + nt * 16, L::kLdP);
          wmma::load_matrix_sync(vf, Vs + nt * 16 * L::kLdT + dt * 16, L::kLdT);
          wmma::mma_sync(of, pf, vf, of);
        }
        wmma::store_matrix_sync(Ow + dt * 16, of, L::kLdO, wmma::mem_row_major);
      }
      __syncthreads();  // K, V are overwritten by the next tile
    }
  }

  // Epilogue: lse per row, then out = O / l written cooperatively (rows < Lq, columns < D).
  if (shalf == 0) {
    const int r = warp * 16 + srow;
    inv_l[r] = 1.f / l_i;
    if (r < rows_q) p.lse[bh * p.Lq + m0 + r] = m_i * kLn2 + logf(l_i);
  }
  __syncthreads();
  T* const out = p.out + (bh * p.Lq + m0) * p.D;
  for (int i = threadIdx.x; i < rows_q * p.D; i += kTcThreads) {
    const int r = i / p.D;
    const int c = i - r * p.D;
    out[i] = Cvt<T>::from_float(Os[r * L::kLdO + c] * inv_l[r]);
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

template <typename T, int D_PAD>
bool launch_tc(const AttnParams<T>& p, int64_t B, bool vec, const cudaDeviceProp& props) {
  const size_t smem = TcSmem<T, D_PAD>::kBytes;
  if (smem > props.sharedMemPerBlockOptin) return false;
  const int64_t num_m_blocks = (p.Lq + kBlockM - 1) / kBlockM;
  const int64_t blocks = B * p.H * num_m_blocks;
  TORCH_CHECK(blocks <= INT32_MAX, "enat: asymmetric_attention_cuda: too many query blocks (", blocks, ")");
  auto kernel = attn_tc_kernel<T, D_PAD>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), kTcThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p, num_m_blocks, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
void launch_simple(const AttnParams<T>& p) {
  const int64_t blocks = (p.rows + kSimpleWarps - 1) / kSimpleWarps;
  TORCH_CHECK(blocks <= INT32_MAX, "enat: asymmetric_attention_cuda: too many query rows (", p.rows, ")");
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
        launched = launch_tc<T, 32>(p, B, vec, props);
      } else if (p.D <= 64) {
        launched = launch_tc<T, 64>(p, B, vec, props);
      } else {
        launched = launch_tc<T, 128>(p, B, vec, props);
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
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
                   "enat: q must be float16, bfloat16 or float32, got ", ::enat::describe(q));
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
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "enat: q.shape[3] (head dim) must be in [1, ",
                    kMaxHeadDim, "], got ", ::enat::describe(q));
  TORCH_CHECK_VALUE(k_ctx.size(2) + k_self.size(2) > 0,
                    "enat: k_ctx and k_self are both empty (no keys to attend to), got ", ::enat::describe(k_ctx),
                    " and ", ::enat::describe(k_self));

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
