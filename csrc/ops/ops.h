// Shared declarations of the torchiter op families: the argument bundles every
// kernel (CPU, CUDA, Meta) receives and the one input-check function per family
// that each of them calls before it writes anything.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace torchiter {

// Options of one projected-SGD step, validated by check_sgd_step.
struct SgdOptions {
  double lr = 0.;
  double momentum = 0.;
  double dampening = 0.;
  double weight_decay = 0.;
  bool nesterov = false;
  bool maximize = false;
  bool first_step = false;
  double shrink = 0.;
  std::optional<double> min;
  std::optional<double> max;
};

// Checks every argument of torchiter.sgd_step_ (list lengths, shapes, dtypes,
// devices, layouts, option values). Throws c10::Error naming the op and the
// argument; on return every tensor may be written.
void check_sgd_step(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum_buffers,
    const SgdOptions& opt);

// The Tensor-lr overload: checks `lr` (0-dim floating tensor on the params'
// device). `check_value` reads it, which is free on CPU but would synchronise a
// CUDA stream, so CUDA kernels pass false.
void check_sgd_lr_tensor(
    at::TensorList params,
    const at::Tensor& lr,
    bool check_value);

// True when p, g (and buf, if given) cover dense memory in the same element
// order, so a kernel may walk them as flat arrays; otherwise kernels work on a
// dense copy and write it back through the param's strides.
bool same_dense_layout(
    const at::Tensor& p,
    const at::Tensor& g,
    const at::Tensor* buf);

// Arguments of torchiter.quadratic_descent after validation.
struct QuadraticDescentArgs {
  double lr = 0.;
  int64_t max_iterations = 0;
  double tol = 0.;
  int64_t check_every = 1;
  double shrink = 0.;
  std::optional<double> min;
  std::optional<double> max;
};

// Checks every argument of torchiter.quadratic_descent. `supported_dtypes`
// lists the dtypes the calling kernel implements.
void check_quadratic_descent(
    const at::Tensor& y0,
    const at::Tensor& A,
    const at::Tensor& b,
    const std::optional<at::Tensor>& lrs,
    const QuadraticDescentArgs& args,
    c10::ArrayRef<at::ScalarType> supported_dtypes);

// The per-iteration learning rates of quadratic_descent on the host:
// lrs[0 .. max_iterations) when given, else `lr` repeated. Values must be
// finite and non-negative.
std::vector<double> host_learning_rates(
    const std::optional<at::Tensor>& lrs,
    const QuadraticDescentArgs& args);

// Checks every argument of torchiter.quadratic_descent_backward (shapes,
// dtypes, devices, shrink), for its kernels.
void check_quadratic_descent_backward(
    const at::Tensor& grad_y,
    const at::Tensor& y,
    const at::Tensor& A,
    double shrink,
    std::optional<double> min,
    std::optional<double> max);

// Sizes of y viewed as (B, C, S): S is the product of the spatial dims.
struct BCS {
  int64_t B, C, S;
};
BCS bcs_sizes(const at::Tensor& y);

} // namespace torchiter
