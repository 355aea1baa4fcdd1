// gather_tokens: out[b, j, :] = x[b, index[b, j], :].
//
// The row machinery of rows.cuh (design at the top of tokens.cu): persistent blocks take contiguous
// ranges of tiles (up to 256 output rows of one batch row); per tile, thread t loads index[b, j0 + t]
// once and writes the pointer pair of row t into a shared table, then groups of 1..32 lanes move the
// rows, two at a time, with every lane's chunks (64 bytes per row for 16-byte chunks) loaded before
// any is stored. Rows move as raw bytes in the widest aligned chunk (16/8/4/2/1 bytes); 64-bit offsets.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../check.h"
#include "../enat_kernels.h"
#include "rows.cuh"

namespace enat {
namespace {

struct GatherParams {
  rows::InRows x;
  rows::IndexRows index;
  rows::OutRows out;
  rows::Plan plan;
};

template <int Bytes>
__global__ void __launch_bounds__(rows::kThreads, rows::kBlocksPerSM) gather_rows_kernel(const GatherParams p) {
  __shared__ rows::Table table;
  const rows::UnitRange range = rows::unit_range(p.plan.units);
  const int t = threadIdx.x;
  int buf = 0;
  for (int64_t u = range.begin; u < range.end; ++u, buf ^= 1) {
    const int64_t b = u / p.plan.tiles_per_row;
    const int64_t j0 = (u - b * p.plan.tiles_per_row) * p.plan.tile;
    const int64_t rest = p.index.n - j0;
    const int len = rest < p.plan.tile ? static_cast<int>(rest) : p.plan.tile;
    if (t < len) {
      table.from[buf][t] = p.x.row(b, p.index.at(b, j0 + t));
      table.to[buf][t] = p.out.row(b, j0 + t);
    }
    __syncthreads();
    rows::move_tile<Bytes>(table.from[buf], table.to[buf], len, p.plan.chunks, p.plan.lanes);
  }
}

}  // namespace

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
  GatherParams p{rows::in_rows(x), rows::index_rows(index), rows::out_rows(out), {}};
  const int width = rows::widest_chunk(row_bytes, p.x, p.out);
  p.plan = rows::plan(out.size(0), out.size(1), row_bytes, width);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  rows::dispatch_chunk(width, [&](auto w) {
    gather_rows_kernel<decltype(w)::value><<<p.plan.grid, rows::kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(enat, CUDA, m) { m.impl("gather_tokens_cuda", &gather_tokens_cuda); }

}  // namespace enat
