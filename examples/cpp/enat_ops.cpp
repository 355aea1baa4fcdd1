// Uses the enat_kernels library from C++: lists the enat:: ops that linking it registered, and,
// on a machine with a GPU, runs gather_tokens_cuda both directly and through the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>

#include "enat_kernels.h"

int main() {
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("enat::", 0) == 0) std::cout << name.name << "\n";
  }
  c10::Dispatcher::singleton().findSchemaOrThrow("enat::gather_tokens_cuda", "");
  if (!torch::cuda::is_available()) {
    std::cout << "no CUDA device: enat:: ops registered, kernels not run\n";
    return 0;
  }
  auto x = torch::randn({2, 6, 8}, torch::kCUDA);
  auto index = torch::tensor({1, 4, 0, 5}, torch::kLong).view({2, 2}).to(torch::kCUDA);
  auto direct = enat::gather_tokens_cuda(x, index);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("enat::gather_tokens_cuda", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  auto dispatched = op.call(x, index);
  auto expected = torch::gather(x, 1, index.unsqueeze(-1).expand({2, 2, 8}));
  const bool ok = direct.equal(expected) && dispatched.equal(expected);
  std::cout << "gather_tokens_cuda " << (ok ? "matches" : "DIFFERS FROM") << " torch::gather\n";
  return ok ? 0 : 1;
}
