// The public op schemas of torchiter, declared once. Kernels register
// themselves per dispatch key in csrc/ops/{cpu,cuda,meta}/. This file has no
// Python dependency, so a C++ program that links the op library finds every
// op through the dispatcher.
#include <ATen/ATen.h>
#include <torch/library.h>

TORCH_LIBRARY(torchiter, m) {
  // The Tensor-lr overload is declared first: Python and TorchScript try
  // overloads in order, and a 0-dim tensor would otherwise be converted to a
  // float (a host synchronisation on CUDA).
  m.def(
      "sgd_step_.tensor_lr(Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, Tensor lr, float momentum=0., "
      "float dampening=0., float weight_decay=0., bool nesterov=False, "
      "bool maximize=False, bool first_step=False, float shrink=0., "
      "float? min=None, float? max=None) -> ()");
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, float lr, float momentum=0., "
      "float dampening=0., float weight_decay=0., bool nesterov=False, "
      "bool maximize=False, bool first_step=False, float shrink=0., "
      "float? min=None, float? max=None) -> ()");
  m.def(
      "quadratic_descent(Tensor y0, Tensor A, Tensor b, float lr, "
      "int max_iterations, float tol=0., int check_every=1, "
      "Tensor? lrs=None, float shrink=0., float? min=None, "
      "float? max=None) -> (Tensor, Tensor)");
}

// With every list empty the dispatcher sees no tensor and would fail to pick
// a backend; the step is then a no-op. For any non-empty call this kernel is
// shadowed by the backend kernels, and it refuses devices that have none.
namespace {
void sgd_step_no_tensors(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    double, double, double, double, bool, bool, bool, double,
    std::optional<double>, std::optional<double>) {
  TORCH_CHECK(
      params.empty() && grads.empty() && bufs.empty(),
      "torchiter.sgd_step_: no kernel for tensors on ",
      !params.empty() ? params[0].device()
                      : (!grads.empty() ? grads[0].device() : bufs[0].device()),
      " (was torchiter built with support for this device?)");
}
} // namespace

TORCH_LIBRARY_IMPL(torchiter, CompositeExplicitAutograd, m) {
  m.impl("sgd_step_", &sgd_step_no_tensors);
}
