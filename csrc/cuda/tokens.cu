// Launchers of the critical-token movement kernels (docs/OPS.md, section 2); the kernels and their
// design are in token_kernels.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
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

// Launches move_rows_kernel over B batch rows of p.items items, rows of row_bytes moved in the widest
// chunks every row set allows (the unused ones, null, allow any); nothing when B, items or bytes are 0.
void launch_move(Params p, int64_t B, int64_t row_bytes) {
  if (B == 0 || p.items == 0 || row_bytes == 0) return;
  const int width = rows::widest_chunk(row_bytes, p.in0, p.in1, p.out0, p.out1);
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

// split_tokens (kSplit: in0 into out0, the masked rows, and out1, the others) and restore_tokens
// (kRestore, the inverse: in0, the masked rows, and in1 into out0): rows in mask's order, n_masked masked.
void launch_by_mask(Params p, const at::Tensor& mask, int64_t n_masked, int64_t row_bytes) {
  p.mask = mask_rows(mask);
  p.limit0 = n_masked;
  p.limit1 = mask.size(1) - n_masked;
  launch_move(p, mask.size(0), row_bytes);
}

// merge_cache (kMerge: in0, the fresh rows, and in1, the cached ones, into out0) and its backward
// (kMergeBackward, the inverse: in0 into out0 and out1): rows at fresh_index and cached_index.
void launch_by_index(Params p, const at::Tensor& fresh_index, const at::Tensor& cached_index, int64_t row_bytes) {
  p.idx0 = rows::index_rows(fresh_index);
  p.idx1 = rows::index_rows(cached_index);
  launch_move(p, fresh_index.size(0), row_bytes);
}

// A named argument and what it must be: a (B, rows, D) token tensor, an int64 (B, n) index or a
// bool (B, L) mask.
enum class Role { kTokens, kIndex, kMask };
struct Arg {
  const char* name;
  const at::Tensor& t;
  Role role;
};

// Checks each argument for its role, then that all are on the device of the first and have its batch
// size, and that the token tensors have one dtype.
void check_args(std::initializer_list<Arg> args) {
  for (const Arg& a : args) {
    const bool tokens = a.role == Role::kTokens;
    const at::ScalarType dtype = a.role == Role::kIndex ? at::kLong : at::kBool;
    ENAT_CHECK_CUDA(a.name, a.t);
    ENAT_CHECK_DIM(a.name, a.t, tokens ? 3 : 2);
    if (tokens) ENAT_CHECK_LAST_DIM_CONTIGUOUS(a.name, a.t);
    else ENAT_CHECK_DTYPE(a.name, a.t, dtype);
  }
  const Arg& first = *args.begin();
  for (const Arg& a : args) {
    if (&a != &first) ENAT_CHECK_SAME_DEVICE(first.name, first.t, a.name, a.t);
  }
  const Arg* first_tokens = nullptr;
  for (const Arg& a : args) {
    if (a.role != Role::kTokens) continue;
    if (first_tokens == nullptr) first_tokens = &a;
    else ENAT_CHECK_SAME_DTYPE(first_tokens->name, first_tokens->t, a.name, a.t);
  }
  for (const Arg& a : args) {
    if (&a != &first) ENAT_CHECK_SIZE(a.name, a.t, 0, first.name, first.t, 0);
  }
}

void check_size(const Arg& a, int64_t dim_a, const Arg& b, int64_t dim_b) {
  ENAT_CHECK_SIZE(a.name, a.t, dim_a, b.name, b.t, dim_b);
}

// An index of n positions into the rows of x: n <= x.shape[1].
void check_fits(const Arg& index, const Arg& x) {
  ENAT_CHECK_VALUE(index.t.size(1) <= x.t.size(1), index.name, " has more positions than ", x.name,
                   " has rows, got ", index.name, " ", ::enat::describe(index.t), " and ", x.name, " ",
                   ::enat::describe(x.t));
}

// Shared by scatter_tokens_cuda, scatter_into_zeros_cuda and zero_rows_cuda: out (B, L, D) where the
// rows at index come from src (or zero without src) and the others from base (or zero without base).
void scatter_rows(const at::Tensor& out, const at::Tensor* base, const at::Tensor& index, const at::Tensor* src) {
  Params p = make_params(Kind::kScatter, out.size(1));
  p.out0 = rows::out_rows(out);
  p.idx0 = rows::index_rows(index);
  if (src != nullptr) p.in0 = rows::in_rows(*src);
  if (base != nullptr) p.in1 = rows::in_rows(*base);
  launch_move(p, out.size(0), out.size(2) * out.element_size());
}

// The arguments of both scatters: base (B, L, D), index (B, n), src (B, n, D), n <= L.
void check_scatter(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src) {
  const Arg b{"base", base, Role::kTokens}, i{"index", index, Role::kIndex}, s{"src", src, Role::kTokens};
  check_args({b, i, s});
  check_size(s, 1, i, 1);
  check_size(s, 2, b, 2);
  check_fits(i, b);
}

}  // namespace

// ---------------------------------------------------------------------------------------------

at::Tensor mask_to_index_cuda(const at::Tensor& mask, int64_t count) {
  check_args({{"mask", mask, Role::kMask}});
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
  Params p = make_params(Kind::kScatterInplace, index.size(1));
  p.out0 = rows::out_rows(base);
  p.in0 = rows::in_rows(src);
  p.idx0 = rows::index_rows(index);
  p.limit0 = base.size(1);
  launch_move(p, base.size(0), base.size(2) * base.element_size());
}

at::Tensor scatter_into_zeros_cuda(const at::Tensor& index, const at::Tensor& src, int64_t L) {
  const Arg s{"src", src, Role::kTokens}, i{"index", index, Role::kIndex};
  check_args({s, i});
  check_size(s, 1, i, 1);
  ENAT_CHECK_VALUE(L >= index.size(1), "L must be >= the number of positions in index, got L = ", L,
                   " and index ", ::enat::describe(index));
  const c10::cuda::CUDAGuard guard(src.device());
  auto out = at::empty({src.size(0), L, src.size(2)}, src.options());
  scatter_rows(out, nullptr, index, &src);
  return out;
}

at::Tensor zero_rows_cuda(const at::Tensor& x, const at::Tensor& index) {
  const Arg a{"x", x, Role::kTokens}, i{"index", index, Role::kIndex};
  check_args({a, i});
  check_fits(i, a);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  scatter_rows(out, &x, index, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> split_tokens_cuda(const at::Tensor& x, const at::Tensor& mask, int64_t n_masked) {
  const Arg a{"x", x, Role::kTokens}, m{"mask", mask, Role::kMask};
  check_args({a, m});
  check_size(m, 1, a, 1);
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  ENAT_CHECK_VALUE(n_masked >= 0 && n_masked <= L, "n_masked must be in [0, ", L, "] for x ", ::enat::describe(x),
                   ", got ", n_masked);
  const c10::cuda::CUDAGuard guard(x.device());
  auto visible = at::empty({B, L - n_masked, D}, x.options());
  auto masked = at::empty({B, n_masked, D}, x.options());
  Params p = make_params(Kind::kSplit, L);
  p.in0 = rows::in_rows(x);
  p.out0 = rows::out_rows(masked);
  p.out1 = rows::out_rows(visible);
  launch_by_mask(p, mask, n_masked, D * x.element_size());
  return {visible, masked};
}

at::Tensor restore_tokens_cuda(const at::Tensor& visible, const at::Tensor& masked, const at::Tensor& mask) {
  const Arg v{"visible", visible, Role::kTokens}, m{"masked", masked, Role::kTokens};
  check_args({v, m, {"mask", mask, Role::kMask}});
  check_size(m, 2, v, 2);
  ENAT_CHECK_VALUE(visible.size(1) + masked.size(1) == mask.size(1),
                   "visible.shape[1] + masked.shape[1] must equal mask.shape[1], got visible ",
                   ::enat::describe(visible), ", masked ", ::enat::describe(masked), " and mask ",
                   ::enat::describe(mask));
  const c10::cuda::CUDAGuard guard(visible.device());
  const int64_t B = mask.size(0), L = mask.size(1), D = visible.size(2);
  auto out = at::empty({B, L, D}, visible.options());
  Params p = make_params(Kind::kRestore, L);
  p.in0 = rows::in_rows(masked);
  p.in1 = rows::in_rows(visible);
  p.out0 = rows::out_rows(out);
  launch_by_mask(p, mask, masked.size(1), D * visible.element_size());
  return out;
}

at::Tensor merge_cache_cuda(const at::Tensor& fresh, const at::Tensor& fresh_index, const at::Tensor& cached,
                            const at::Tensor& cached_index) {
  const Arg f{"fresh", fresh, Role::kTokens}, fi{"fresh_index", fresh_index, Role::kIndex};
  const Arg c{"cached", cached, Role::kTokens}, ci{"cached_index", cached_index, Role::kIndex};
  check_args({f, fi, c, ci});
  check_size(fi, 1, f, 1);
  check_size(c, 2, f, 2);
  check_size(ci, 1, c, 1);
  const c10::cuda::CUDAGuard guard(fresh.device());
  const int64_t B = fresh.size(0), nf = fresh.size(1), nc = cached.size(1), D = fresh.size(2);
  auto out = at::empty({B, nf + nc, D}, fresh.options());
  Params p = make_params(Kind::kMerge, nf + nc);
  p.in0 = rows::in_rows(fresh);
  p.in1 = rows::in_rows(cached);
  p.out0 = rows::out_rows(out);
  launch_by_index(p, fresh_index, cached_index, D * fresh.element_size());
  return out;
}

std::tuple<at::Tensor, at::Tensor> merge_cache_backward_cuda(const at::Tensor& grad, const at::Tensor& fresh_index,
                                                             const at::Tensor& cached_index) {
  check_args({{"grad", grad, Role::kTokens}, {"fresh_index", fresh_index, Role::kIndex},
              {"cached_index", cached_index, Role::kIndex}});
  const int64_t B = grad.size(0), nf = fresh_index.size(1), nc = cached_index.size(1), D = grad.size(2);
  ENAT_CHECK_VALUE(grad.size(1) == nf + nc,
                   "grad.shape[1] must equal fresh_index.shape[1] + cached_index.shape[1], got grad ",
                   ::enat::describe(grad), ", fresh_index ", ::enat::describe(fresh_index), " and cached_index ",
                   ::enat::describe(cached_index));
  const c10::cuda::CUDAGuard guard(grad.device());
  auto grad_fresh = at::empty({B, nf, D}, grad.options());
  auto grad_cached = at::empty({B, nc, D}, grad.options());
  Params p = make_params(Kind::kMergeBackward, nf + nc);
  p.in0 = rows::in_rows(grad);
  p.out0 = rows::out_rows(grad_fresh);
  p.out1 = rows::out_rows(grad_cached);
  launch_by_index(p, fresh_index, cached_index, D * grad.element_size());
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
