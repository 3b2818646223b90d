// CPU entry points of torchiter.sgd_step_: checks, the segment plan shared
// with CUDA (../step_plan.h), then the kernel variant picked for this CPU
// (kernels/sgd_step.cpp, one build per instruction set).
#include "../ops.h"
#include "../step_plan.h"
#include "capability.h"

#include <torch/library.h>

namespace torchiter {
namespace {

void sgd_step_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    double /*lr, in opt*/, const SgdOptions& opt) {
  check_sgd_step(params, grads, bufs, opt);
  TORCH_CHECK(
      params.empty() || params[0].device().is_cpu(),
      "torchiter.sgd_step_: the CPU kernel got tensors on ", params[0].device());
  const StepPlan plan(params, grads, bufs, opt.momentum != 0);
  const auto& kernels = cpu::cpu_kernels();
  for (const auto& [dtype, segments] : plan.groups()) {
    kernels.sgd_step(dtype, segments, opt);
  }
  plan.write_back();
}

void sgd_step_tensor_lr_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    const at::Tensor& lr, const SgdOptions& opt) {
  check_sgd_lr_tensor(params, lr, /*check_value=*/true);
  SgdOptions with_lr = opt;
  with_lr.lr = lr.item<double>();
  sgd_step_cpu(params, grads, bufs, with_lr.lr, with_lr);
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, CPU, m) {
  m.impl("sgd_step_", &sgd_step_entry<double, &sgd_step_cpu>);
  m.impl("sgd_step_.tensor_lr", &sgd_step_entry<const at::Tensor&, &sgd_step_tensor_lr_cpu>);
}

} // namespace torchiter
