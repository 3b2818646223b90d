// Meta kernels of torchiter.sgd_step_: the same input checks as the real
// kernels and no data access, so FakeTensor tracing (torch.compile, export)
// rejects bad calls exactly as eager does.
#include "../ops.h"

#include <torch/library.h>

namespace torchiter {
namespace {

void sgd_step_meta(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    double /*lr, in opt*/, const SgdOptions& opt) {
  check_sgd_step(params, grads, bufs, opt);
}

void sgd_step_tensor_lr_meta(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    const at::Tensor& lr, const SgdOptions& opt) {
  check_sgd_lr_tensor(params, lr, /*check_value=*/false);
  // The value of lr is unknown while tracing; opt.lr is 0, which passes the
  // range checks.
  check_sgd_step(params, grads, bufs, opt);
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, Meta, m) {
  m.impl("sgd_step_", &sgd_step_entry<double, &sgd_step_meta>);
  m.impl("sgd_step_.tensor_lr", &sgd_step_entry<const at::Tensor&, &sgd_step_tensor_lr_meta>);
}

} // namespace torchiter
