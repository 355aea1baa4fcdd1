// asymmetric_attention_cuda: the launcher of the kernels in attention_kernels.cuh (design there). It
// checks the arguments, allocates out as (B, Lq, H, D) (returned as its (B, H, Lq, D) transpose) and lse,
// plans the tensor-core tiles (plan_tc: copy width and D_PAD) and launches one kernel.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../check.h"
#include "../enat_kernels.h"
#include "attention_kernels.cuh"

namespace enat {
namespace {

using attention::AttnParams;

constexpr double kLog2e = 1.4426950408889634;

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
    p.out_stride[d] = out.stride(d);
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

attention::Layout layout(const at::Tensor& t) {
  attention::Layout x{reinterpret_cast<uintptr_t>(t.const_data_ptr()), {}, {}};
  for (int d = 0; d < 4; ++d) {
    x.size[d] = t.size(d);
    x.stride[d] = t.stride(d);
  }
  return x;
}

template <typename T, typename S>
bool launch_tc(const AttnParams<T>& p, int64_t B, int copy_width, const cudaDeviceProp& props) {
  const size_t smem = S::kBytes;
  if (smem > props.sharedMemPerBlockOptin) return false;
  const int64_t num_m_blocks = (p.Lq + S::kBlockM - 1) / S::kBlockM;
  const int64_t blocks = B * p.H * num_m_blocks;
  ENAT_CHECK_VALUE(blocks <= INT32_MAX, "asymmetric_attention_cuda: too many query blocks (", blocks, ")");
  auto kernel = attention::attn_tc_kernel<T, S::kDPad, S::kWarps>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), S::kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      p, static_cast<int>(num_m_blocks), copy_width);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
void launch_simple(const AttnParams<T>& p) {
  using attention::kSimpleThreads;
  using attention::kSimpleWarps;
  const int64_t blocks = (p.rows + kSimpleWarps - 1) / kSimpleWarps;
  ENAT_CHECK_VALUE(blocks <= INT32_MAX, "asymmetric_attention_cuda: too many query rows (", p.rows, ")");
  attention::attn_simple_kernel<T>
      <<<static_cast<unsigned>(blocks), kSimpleThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx, const at::Tensor& k_self,
         const at::Tensor& v_self, at::Tensor& out, at::Tensor& lse, double scale, bool tensor_cores) {
  const AttnParams<T> p = make_params<T>(q, k_ctx, v_ctx, k_self, v_self, out, lse, scale);
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      const attention::Layout layouts[5] = {layout(q), layout(k_ctx), layout(v_ctx), layout(k_self), layout(v_self)};
      const attention::TcPlan plan = attention::plan_tc(layouts, p.D);
      const cudaDeviceProp& props = *at::cuda::getCurrentDeviceProperties();
      bool tried = false, launched = false;
      // 128-row blocks (8 warps) halve the K/V traffic per query row; short queries keep 64-row blocks.
      attention::for_each_tc_shape([&](auto shape) {
        using S = decltype(shape);
        if (tried || S::kDPad != plan.d_pad || (S::kWarps == 8 && p.Lq <= 64)) return;
        tried = true;
        launched = launch_tc<T, S>(p, q.size(0), plan.width, props);
      });
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
  ENAT_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= attention::kMaxHeadDim, "q.shape[3] (head dim) must be in [1, ",
                   attention::kMaxHeadDim, "], got ", ::enat::describe(q));
  ENAT_CHECK_VALUE(k_ctx.size(2) + k_self.size(2) > 0,
                   "k_ctx and k_self are both empty (no keys to attend to), got ", ::enat::describe(k_ctx), " and ",
                   ::enat::describe(k_self));

  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  auto out = at::empty({B, Lq, H, D}, q.options()).transpose(1, 2);  // out.transpose(1, 2) is contiguous
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
