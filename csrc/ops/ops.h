// Shared declarations of the torchiter op families: the argument bundles every
// kernel (CPU, CUDA, Meta) receives and the one input-check function per family
// that each of them calls before it writes anything.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <type_traits>
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

// The per-iteration learning rates of quadratic_descent on the host: lrs[k]
// when lrs is given, else `lr`. The tensor is read in blocks as the loop
// reaches them (each value checked to be finite and >= 0 before it is used),
// so time and memory follow the iterations run, not max_iterations.
class LearningRates {
 public:
  LearningRates(const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args);
  // True when the rates come from `lrs`.
  bool scheduled() const {
    return lrs_.defined();
  }
  // The rate of iteration k, 0 <= k < max_iterations. Out of line: the CPU
  // kernels are compiled once per instruction set, and an inline copy built
  // with AVX-512 could be the one the linker keeps for all of them.
  double at(int64_t k);

 private:
  void load(int64_t k);
  at::Tensor lrs_;
  double lr_;
  int64_t max_iterations_;
  int64_t block_start_ = 0;
  int64_t next_block_ = 256;
  std::vector<double> block_;
};

// Checks every argument of torchiter.quadratic_descent_backward (shapes,
// dtypes, devices, shrink), for its kernels.
void check_quadratic_descent_backward(
    const at::Tensor& grad_y,
    const at::Tensor& y,
    const at::Tensor& A,
    double shrink,
    std::optional<double> min,
    std::optional<double> max);

// Sizes of y viewed as (batch, channels, spatial): `spatial` is the product
// of the dims after the first two (1 for a 2-D y).
struct BatchChannelSpatial {
  int64_t batch, channels, spatial;
};
inline BatchChannelSpatial batch_channel_spatial(const at::Tensor& y) {
  int64_t spatial = 1;
  for (int64_t d = 2; d < y.dim(); ++d) {
    spatial *= y.size(d);
  }
  return {y.size(0), y.size(1), spatial};
}

// The one place where the schemas' scalar arguments become an options
// struct: every kernel of an op (CPU, CUDA, Meta, the no-backend kernel) is
// registered as the adapter below around a function of the tensors and the
// options, so no kernel unpacks the argument list itself.
//
// sgd_step_: Impl(params, grads, momentum_buffers, lr, options), LR being
// double (options.lr == lr) or const at::Tensor& for the Tensor-lr overload
// (options.lr == 0, the value lives in the tensor).
template <typename LR, auto Impl>
void sgd_step_entry(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    LR lr, double momentum, double dampening, double weight_decay,
    bool nesterov, bool maximize, bool first_step, double shrink,
    std::optional<double> min, std::optional<double> max) {
  SgdOptions opt{0., momentum, dampening, weight_decay, nesterov, maximize,
                 first_step, shrink, min, max};
  if constexpr (std::is_same_v<std::decay_t<LR>, double>) {
    opt.lr = lr;
  }
  Impl(params, grads, bufs, lr, opt);
}

// quadratic_descent: Impl(y0, A, b, lrs, args).
template <auto Impl>
std::tuple<at::Tensor, at::Tensor> quadratic_descent_entry(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    double lr, int64_t max_iterations, double tol, int64_t check_every,
    const std::optional<at::Tensor>& lrs, double shrink,
    std::optional<double> min, std::optional<double> max) {
  return Impl(
      y0, A, b, lrs,
      QuadraticDescentArgs{lr, max_iterations, tol, check_every, shrink, min, max});
}

} // namespace torchiter
