// Meta kernels of torchiter.sgd_step_: the same input checks as the real
// kernels and no data access, so FakeTensor tracing (torch.compile, export)
// rejects bad calls exactly as eager does.
#include "../ops.h"

#include <torch/library.h>

namespace torchiter {
namespace {

void sgd_step_meta(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    double lr, double momentum, double dampening, double weight_decay,
    bool nesterov, bool maximize, bool first_step, double shrink,
    std::optional<double> min, std::optional<double> max) {
  check_sgd_step(
      params, grads, bufs,
      SgdOptions{lr, momentum, dampening, weight_decay, nesterov, maximize,
                 first_step, shrink, min, max});
}

void sgd_step_tensor_lr_meta(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    const at::Tensor& lr, double momentum, double dampening,
    double weight_decay, bool nesterov, bool maximize, bool first_step,
    double shrink, std::optional<double> min, std::optional<double> max) {
  check_sgd_lr_tensor(params, lr, /*check_value=*/false);
  // The value of lr is unknown while tracing; 0 passes the range checks.
  sgd_step_meta(
      params, grads, bufs, 0., momentum, dampening, weight_decay, nesterov,
      maximize, first_step, shrink, min, max);
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, Meta, m) {
  m.impl("sgd_step_", &sgd_step_meta);
  m.impl("sgd_step_.tensor_lr", &sgd_step_tensor_lr_meta);
}

} // namespace torchiter
