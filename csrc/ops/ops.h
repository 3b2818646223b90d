// Shared declarations of the torchiter op families: the argument bundles every
// kernel (CPU, CUDA, Meta) receives and the one input-check function per family
// that each of them calls before it writes anything.
#pragma once

#include <ATen/ATen.h>

#include <functional>
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
  // quadratic_descent_ex only: each sample stops on its own test, and the
  // change of every iteration is recorded.
  bool per_sample = false;
  bool trace = false;
  // Set by quadratic_descent_ex's kernels: measure the statistics below
  // (quadratic_descent skips that work).
  bool stats = false;
  // Set by the CPU entry points for a bfloat16 loop (run in float32): the
  // kernel may mix channels on bfloat16 dot products, rounding y to bfloat16
  // for the product only (see the kernel's steps.h).
  bool bf16_mixing = false;
};

// Longest change trace quadratic_descent_ex records (its length is
// max_iterations, so that its shape is known before the loop runs).
constexpr int64_t kMaxTraceIterations = int64_t{1} << 24;

// What quadratic_descent_ex returns. Per sample (per_sample=True) every
// statistic has shape (B,), else (). `change` is max |y_k - y_{k-1}| of the
// last iteration run, `growth` that change over the first iteration's
// (0 when both are 0): it never exceeds 1 for a step within 2/L on a convex
// problem. `change_trace` is (max_iterations,) with trace=True (NaN past the
// last iteration), else (0,).
struct QuadraticDescentResult {
  at::Tensor y, iterations, converged, change, growth, change_trace;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  as_tuple() const {
    return {y, iterations, converged, change, growth, change_trace};
  }
};

// quadratic_descent_ex's outputs from what a loop measured, on y's device:
// per-sample (or, with one entry, whole-batch) iteration counts (int64),
// stop-test flags (bool), and the changes of the first and the last
// iteration (y's dtype), each of shape (n,).
QuadraticDescentResult make_ex_result(
    at::Tensor y, const at::Tensor& iterations, const at::Tensor& converged,
    const at::Tensor& first_change, const at::Tensor& last_change,
    at::Tensor change_trace, bool per_sample);

// What make_ex_result gives, from host vectors (the CPU kernel's; y on the
// CPU; the changes as doubles, exact for float and double), written
// directly into the result tensors; out of the ISA-specific files.
QuadraticDescentResult make_ex_result_host(
    at::Tensor y, const std::vector<int64_t>& iterations,
    const std::vector<uint8_t>& converged, const std::vector<double>& first_change,
    const std::vector<double>& last_change, const std::vector<double>& change_trace,
    bool per_sample);

// The plain loop of one device (its quadratic_descent kernel on checked
// inputs), which the device-generic quadratic_descent_ex driver runs between
// the iterations it measures.
using PlainQuadraticDescent = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args);

// quadratic_descent_ex on any device from ATen ops and `plain`: chunks of
// plain iterations, and one measured iteration wherever a statistic or the
// stop test needs the change (one host synchronisation per stop test, none
// otherwise). Frozen samples leave the batch (per_sample), so they cost
// nothing. Inputs must be checked.
QuadraticDescentResult quadratic_descent_ex_generic(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args,
    PlainQuadraticDescent plain);

// A view of the first prod(sizes) elements of the contiguous `base`, shaped
// `sizes`. Out of line: the CPU kernel files are compiled once per
// instruction set, and the view code inlined there could leave a wide copy
// of a shared helper in the library.
at::Tensor prefix_view(const at::Tensor& base, at::IntArrayRef sizes);

// The first `cols` columns of the row-major (rows, ld) matrix at the start of
// the contiguous `base`: a (rows, cols) view with row stride ld. Out of line
// for the same reason as prefix_view.
at::Tensor column_block_view(const at::Tensor& base, int64_t rows, int64_t cols, int64_t ld);

// The dtypes quadratic_descent takes on every device. float16 and bfloat16
// run the float32 loop (see with_float32_loop).
inline constexpr at::ScalarType kLoopDtypes[] = {
    at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

inline bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

// float16 and bfloat16 loops: y0, A and b are widened to float32 once, the
// whole loop runs there (the op contract's float32 accumulation, with the
// state kept in float32 between iterations too, so no rounding error builds
// up over the iterations), and the floating results are rounded back to
// y0's dtype once. `run` is the float32 kernel entry.
std::tuple<at::Tensor, at::Tensor> with_float32_loop(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::function<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&)>& run);
QuadraticDescentResult with_float32_loop_ex(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::function<QuadraticDescentResult(
        const at::Tensor&, const at::Tensor&, const at::Tensor&)>& run);

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
// so time and memory follow the iterations run, not max_iterations. Only a
// CPU tensor is accepted: reading a device tensor here would synchronise the
// host once per block, so the CUDA kernels read a device `lrs` themselves.
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
  const char* op_;
  double lr_;
  int64_t max_iterations_;
  int64_t block_start_ = 0;
  int64_t next_block_ = 256;
  std::vector<double> block_;
};

// The linear solves of torchiter.quadratic_descent_backward on one device.
struct ImplicitSolvers {
  // x with A^T x = g for every column g of `rhs`: At is A^T (C, C), rhs
  // (C, n); returns x as (C, n).
  at::Tensor (*shared)(const at::Tensor& At, const at::Tensor& rhs);
  // x_i with M_i x_i = r_i: M (k, C, C) contiguous, a temporary the solver
  // may overwrite; rhs (k, C); returns x as (k, C). `first_row` is M_0's row
  // in the batch flattened as (B * spatial), for error messages.
  at::Tensor (*per_row)(const at::Tensor& M, const at::Tensor& rhs, int64_t first_row);
};

// quadratic_descent_backward's kernel with a device's solvers (inputs
// checked here): returns (grad_A, grad_b).
std::tuple<at::Tensor, at::Tensor> quadratic_descent_backward_with(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& A,
    double shrink, std::optional<double> min, std::optional<double> max,
    const ImplicitSolvers& solvers);

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

// quadratic_descent_ex: Impl(y0, A, b, lrs, args) -> QuadraticDescentResult.
template <auto Impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
quadratic_descent_ex_entry(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    double lr, int64_t max_iterations, double tol, int64_t check_every,
    const std::optional<at::Tensor>& lrs, double shrink,
    std::optional<double> min, std::optional<double> max, bool per_sample,
    bool trace) {
  QuadraticDescentArgs args{lr, max_iterations, tol, check_every, shrink, min, max};
  args.per_sample = per_sample;
  args.trace = trace;
  args.stats = true;
  return Impl(y0, A, b, lrs, args).as_tuple();
}

} // namespace torchiter
