// Launchers of the critical-token movement kernels (docs/OPS.md, section 2); the kernels and their
// design are in token_kernels.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../check.h"
#include "../enat_kernels.h"
#include "rows_tensors.h"
#include "token_kernels.cuh"

namespace enat {
namespace {

using tokens::Kind;
using tokens::MaskRows;
using tokens::Params;

MaskRows mask_rows(const at::Tensor& mask) {
  return {static_cast<const uint8_t*>(mask.const_data_ptr()), mask.stride(0), mask.stride(1)};
}

// Launches move_rows_kernel over B batch rows of p.items items (both > 0), rows of row_bytes (> 0)
// moved in chunks of `width`.
void launch_move(Params p, int64_t B, int64_t row_bytes, int width) {
  p.plan = rows::plan_here(B, p.items, row_bytes, width);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  rows::dispatch_chunk(width, [&](auto w) {
    tokens::move_rows_kernel<decltype(w)::value><<<p.plan.grid, rows::kThreads, 0, stream>>>(p);
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
  tokens::mask_to_index_kernel<<<static_cast<unsigned>(B), rows::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
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
