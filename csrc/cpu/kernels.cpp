// The "cpu" backend of enat_kernels: forward kernels for CPU tensors, as the Python module
// enat_kernels._cpu. At the sizes where generation on a CPU is bound by host time (a few dozen tokens,
// narrow rows), one call into a loop over rows costs less than the several PyTorch calls the reference
// makes; enat_kernels/ops declares the sizes and dtypes each kernel takes and why not the others.
// The gradients of these ops run on the reference backend. Inputs are validated in Python (shapes,
// dtypes, a contiguous last dimension); the checks here only guard against a caller that skipped it.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// One strided view's pointer and strides, as the kernels read it (last dimension contiguous).
template <typename T>
struct View {
  const T* data;
  int64_t s0, s1, s2;  // strides of the leading dimensions (elements)
  explicit View(const at::Tensor& t) : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.dim() > 2 ? t.stride(2) : 0) {}
  const T* row(int64_t i, int64_t j, int64_t k = 0) const { return data + i * s0 + j * s1 + k * s2; }
};

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a contiguous last dimension");
}

// Four independent partial sums, so that the compiler can keep several multiply-adds in flight.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += a[j] * b[j];
    s1 += a[j + 1] * b[j + 1];
    s2 += a[j + 2] * b[j + 2];
    s3 += a[j + 3] * b[j + 3];
  }
  for (; j < n; ++j) s0 += a[j] * b[j];
  return (s0 + s1) + (s2 + s3);
}

// Grain of at::parallel_for: about 32K multiply-adds per task, so small calls stay on one thread.
int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item)); }

// out[b, h, i] = softmax over the keys of both segments of (q[b, h, i] . k) * scale, times v. The
// scores of a query row against the Lc + Ls keys are kept in a buffer (two passes: max, then exp and
// the weighted sum of values); the segments are read where they lie, one after the other.
template <typename T>
void attention_rows(const at::Tensor& q, const at::Tensor& k_ctx, const at::Tensor& v_ctx, const at::Tensor& k_self,
                    const at::Tensor& v_self, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Lc = k_ctx.size(2), Ls = k_self.size(2), Lk = Lc + Ls;
  const View<T> Q(q), KC(k_ctx), VC(v_ctx), KS(k_self), VS(v_self);
  T* o_ptr = out.data_ptr<T>();
  const int64_t so_b = out.stride(0), so_h = out.stride(1), so_l = out.stride(2);
  T* l_ptr = lse.data_ptr<T>();
  at::parallel_for(0, B * H * Lq, grain(Lk * D * 2), [&](int64_t begin, int64_t end) {
    std::vector<T> scores(Lk), q_row(D), acc(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * Lq), h = (r / Lq) % H, i = r % Lq;
      const T* qi = Q.row(b, h, i);
      for (int64_t d = 0; d < D; ++d) q_row[d] = qi[d] * static_cast<T>(scale);
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < Lc; ++j) m = std::max(m, scores[j] = dot(q_row.data(), KC.row(b, h, j), D));
      for (int64_t j = 0; j < Ls; ++j) m = std::max(m, scores[Lc + j] = dot(q_row.data(), KS.row(b, h, j), D));
      T denominator = 0;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j = 0; j < Lk; ++j) {
        const T p = std::exp(scores[j] - m);
        denominator += p;
        const T* v = j < Lc ? VC.row(b, h, j) : VS.row(b, h, j - Lc);
        for (int64_t d = 0; d < D; ++d) acc[d] += p * v[d];
      }
      T* o = o_ptr + b * so_b + h * so_h + i * so_l;
      const T inverse = T(1) / denominator;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inverse;
      l_ptr[r] = m + std::log(denominator);
    }
  });
}

// q (B, H, Lq, D); k_ctx, v_ctx (B, H, Lc, D); k_self, v_self (B, H, Ls, D); float32 or float64.
// Returns out (B, H, Lq, D), laid out (B, Lq, H, D) as every backend lays it out (the model's merge of
// the heads is then a view), and lse (B, H, Lq) contiguous, both in q's dtype.
std::tuple<at::Tensor, at::Tensor> asymmetric_attention(const at::Tensor& q, const at::Tensor& k_ctx,
                                                        const at::Tensor& v_ctx, const at::Tensor& k_self,
                                                        const at::Tensor& v_self, double scale) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k_ctx, "k_ctx"}, {&v_ctx, "v_ctx"}, {&k_self, "k_self"}, {&v_self, "v_self"}}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == q.scalar_type(), name, " must be 4-d, in q's dtype");
    check_rows(*t, name);
  }
  TORCH_CHECK(k_ctx.size(2) + k_self.size(2) > 0, "k_ctx and k_self are both empty");
  auto out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "asymmetric_attention_cpu", [&] {
    attention_rows<scalar_t>(q, k_ctx, v_ctx, k_self, v_self, scale, out, lse);
  });
  return {out, lse};
}

// out[b, l] = (x[b, l] - mean) * rstd * (1 + scale[b]) + shift[b] for one row of d values; mean and
// the biased variance in two passes over the row.
template <typename T>
inline void adaln_row(const T* x, const T* shift, const T* scale, double eps, int64_t d, T* out) {
  T sum = 0;
  for (int64_t j = 0; j < d; ++j) sum += x[j];
  const T mean = sum / static_cast<T>(d);
  T squares = 0;
  for (int64_t j = 0; j < d; ++j) squares += (x[j] - mean) * (x[j] - mean);
  const T rstd = T(1) / std::sqrt(squares / static_cast<T>(d) + static_cast<T>(eps));
  for (int64_t j = 0; j < d; ++j) out[j] = (x[j] - mean) * rstd * (T(1) + scale[j]) + shift[j];
}

void check_modulation(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(2) && t.scalar_type() == x.scalar_type(),
              name, " must be (B, d) in x's dtype");
  check_rows(t, name);
}

// x (B, L, d), shift and scale (B, d); float32 or float64. Returns out (B, L, d), contiguous.
at::Tensor adaln(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  TORCH_CHECK(x.dim() == 3, "x must be (B, L, d)");
  check_rows(x, "x");
  check_modulation(x, shift, "shift");
  check_modulation(x, scale, "scale");
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2);
  auto out = at::empty({B, L, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaln_cpu", [&] {
    const View<scalar_t> X(x), SH(shift), SC(scale);
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, grain(4 * d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / L;
        adaln_row(X.row(b, r % L), SH.row(b, 0), SC.row(b, 0), eps, d, o + r * d);
      }
    });
  });
  return out;
}

// x, y (B, L, d); gate, shift, scale (B, d). x_new = x + gate[b] * y (rounded to the dtype once), and
// out = adaln(x_new, shift, scale). Returns (x_new, out), contiguous.
std::tuple<at::Tensor, at::Tensor> residual_adaln(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                                                  const at::Tensor& shift, const at::Tensor& scale, double eps) {
  TORCH_CHECK(x.dim() == 3 && y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "x and y must be (B, L, d), one dtype");
  check_rows(x, "x");
  check_rows(y, "y");
  check_modulation(x, gate, "gate");
  check_modulation(x, shift, "shift");
  check_modulation(x, scale, "scale");
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2);
  auto x_new = at::empty({B, L, d}, x.options());
  auto out = at::empty({B, L, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_adaln_cpu", [&] {
    const View<scalar_t> X(x), Y(y), G(gate), SH(shift), SC(scale);
    scalar_t* xn = x_new.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, grain(6 * d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / L, l = r % L;
        const scalar_t *xr = X.row(b, l), *yr = Y.row(b, l), *g = G.row(b, 0);
        scalar_t* xnr = xn + r * d;
        for (int64_t j = 0; j < d; ++j) xnr[j] = xr[j] + g[j] * yr[j];
        adaln_row(xnr, SH.row(b, 0), SC.row(b, 0), eps, d, o + r * d);
      }
    });
  });
  return {x_new, out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU forward kernels of enat_kernels (the cpu backend)";
  m.def("asymmetric_attention", &asymmetric_attention, "(q, k_ctx, v_ctx, k_self, v_self, scale) -> (out, lse)");
  m.def("adaln", &adaln, "(x, shift, scale, eps) -> out");
  m.def("residual_adaln", &residual_adaln, "(x, y, gate, shift, scale, eps) -> (x_new, out)");
}
