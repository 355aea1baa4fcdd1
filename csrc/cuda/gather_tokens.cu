// gather_tokens: out[b, j, :] = x[b, index[b, j], :]. The launcher; the kernel and its design are in
// gather_kernels.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../check.h"
#include "../enat_kernels.h"
#include "rows_tensors.h"
#include "gather_kernels.cuh"

namespace enat {

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

  const int64_t row_bytes = x.size(2) * x.element_size();
  tokens::GatherParams p{rows::in_rows(x), rows::index_rows(index), rows::out_rows(out), {}};
  const int width = rows::widest_chunk(row_bytes, p.x, p.out);
  p.plan = rows::plan_here(out.size(0), out.size(1), row_bytes, width);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  rows::dispatch_chunk(width, [&](auto w) {
    tokens::gather_rows_kernel<decltype(w)::value><<<p.plan.grid, rows::kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(enat, CUDA, m) { m.impl("gather_tokens_cuda", &gather_tokens_cuda); }

}  // namespace enat
