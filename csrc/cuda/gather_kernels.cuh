// Device code of gather_tokens (launched by gather_tokens.cu): out[b, j, :] = x[b, index[b, j], :] with
// the row machinery of rows.cuh (design at the top of token_kernels.cuh): persistent blocks take
// contiguous ranges of tiles (up to 256 output rows of one batch row); per tile, thread t loads
// index[b, j0 + t] once and writes the pointer pair of row t into a shared table, then groups of 1..32
// lanes move the rows, two at a time, with every lane's chunks (64 bytes per row for 16-byte chunks)
// loaded before any is stored. Rows move as raw bytes in the widest aligned chunk (16/8/4/2/1 bytes);
// 64-bit offsets. No torch headers (scripts/cuda_resources.py compiles the kernel alone).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rows.cuh"

namespace enat {
namespace tokens {

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

}  // namespace tokens
}  // namespace enat
