// Every kernel of enat_kernels._C, without the torch launchers, for scripts/cuda_resources.py: nvcc compiles
// this file with `-Xptxas -v` for the resource table, and the program it builds (it needs no GPU) prints
// the dynamic shared memory each launcher requests and, for layouts read from stdin, the attention tile
// plan (attention::plan_tc, as the launcher calls it).
//
//   ./cuda_resources                   "smem <kernel> <bytes>" per kernel that takes dynamic shared memory
//   ./cuda_resources plan < layouts    "<copy width> <D_PAD>" per line of five tensors (q, k_ctx, v_ctx,
//                                      k_self, v_self), each as: address B H L D stride_b stride_h stride_l stride_d
#include <cstdio>
#include <cstring>

#include "cuda/attention_kernels.cuh"
#include "cuda/gather_kernels.cuh"
#include "cuda/token_kernels.cuh"

namespace {

using namespace enat;

template <typename T> const char* type_name();
template <> const char* type_name<__half>() { return "__half"; }
template <> const char* type_name<__nv_bfloat16>() { return "__nv_bfloat16"; }
template <> const char* type_name<float>() { return "float"; }

// Taking a kernel's address instantiates it; the launchers take the same ones.
volatile const void* sink;
void keep(const void* kernel) { sink = kernel; }

// The tensor-core kernels of one dtype, printing the dynamic shared memory of each.
template <typename T>
void tensor_core_kernels() {
  attention::for_each_tc_shape([](auto shape) {
    using S = decltype(shape);
    keep(reinterpret_cast<const void*>(attention::attn_tc_kernel<T, S::kDPad, S::kWarps>));
    std::printf("smem attn_tc_kernel<%s, %d, %d> %zu\n", type_name<T>(), S::kDPad, S::kWarps, S::kBytes);
  });
}

void token_kernels() {
  rows::for_each_chunk([](auto w) {
    keep(reinterpret_cast<const void*>(tokens::move_rows_kernel<decltype(w)::value>));
    keep(reinterpret_cast<const void*>(tokens::gather_rows_kernel<decltype(w)::value>));
  });
  keep(reinterpret_cast<const void*>(tokens::mask_to_index_kernel));
}

int plans() {
  attention::Layout t[5];
  for (;;) {
    for (attention::Layout& x : t) {
      unsigned long long addr;
      long long v[8];
      if (std::scanf("%llu %lld %lld %lld %lld %lld %lld %lld %lld", &addr, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                     &v[6], &v[7]) != 9) {
        return 0;
      }
      x.addr = addr;
      for (int d = 0; d < 4; ++d) {
        x.size[d] = v[d];
        x.stride[d] = v[4 + d];
      }
    }
    const attention::TcPlan plan = attention::plan_tc(t, t[0].size[3]);
    std::printf("%d %d\n", plan.width, plan.d_pad);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "plan") == 0) return plans();
  tensor_core_kernels<__half>();
  tensor_core_kernels<__nv_bfloat16>();
  keep(reinterpret_cast<const void*>(attention::attn_simple_kernel<__half>));
  keep(reinterpret_cast<const void*>(attention::attn_simple_kernel<__nv_bfloat16>));
  keep(reinterpret_cast<const void*>(attention::attn_simple_kernel<float>));
  token_kernels();
  return 0;
}
