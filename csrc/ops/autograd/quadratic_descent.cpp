// Gradients of torchiter.quadratic_descent by implicit differentiation at the
// projected fixed point, and the Autograd kernel that attaches them.
//
// The loop iterates y <- P(y - lr (A y - b)) independently at every sample and
// spatial position (a vector y of C channels), with P the soft threshold then
// the clamp. At a fixed point y* split the channels into
//   N: entries the projection holds (at a clamp bound, or zeroed by the soft
//      threshold), locally constant in A and b, so dy_N = 0;
//   S: the rest, where P is the identity plus a constant shift -shrink*sign:
//      y_S = y_S - lr ((A y)_S - b_S) - shrink sign(y_S), i.e.
//      A_SS y_S = b_S - (shrink / lr) sign(y_S) - A_SN y_N.
// Differentiating the last line (sign(y_S), y_N and shrink/lr are locally
// constant): A_SS dy_S = db_S - (dA y)_S. For an upstream gradient g = dL/dy,
//   dL = g_S^T A_SS^{-1} (db_S - (dA y)_S) = x_S^T db_S - x_S^T (dA y)_S
// with A_SS^T x_S = g_S, so grad_b = x (0 on N) and grad_A = -sum x y^T over
// samples and positions (y whole, including the held entries). The fixed
// point, hence its gradient, does not depend on y0, lr or lrs: they get none.
//
// The active set is read from the returned y itself (entries equal to a
// bound, or zero under a soft threshold), so the gradient is that of the
// fixed point through the returned y whether or not the loop converged; the
// op's iteration count tells the caller. Memory: the saved y and A only,
// whatever the number of iterations.
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

namespace torchiter {

namespace {

constexpr const char* kBackwardOp = "torchiter.quadratic_descent_backward";

// (B, C, *spatial) -> (B*S, C): one row per sample and position.
at::Tensor rows(const at::Tensor& t, const BatchChannelSpatial& s) {
  return t.reshape({s.batch, s.channels, s.spatial}).transpose(1, 2).reshape({s.batch * s.spatial, s.channels});
}

at::Tensor unrows(const at::Tensor& r, const at::Tensor& like, const BatchChannelSpatial& s) {
  return r.reshape({s.batch, s.spatial, s.channels}).transpose(1, 2).reshape(like.sizes());
}

// Entries of y (rows) the projection does not hold: 1 where active, else 0.
at::Tensor active_mask(
    const at::Tensor& y, double shrink, std::optional<double> min,
    std::optional<double> max) {
  at::Tensor mask = at::ones_like(y, y.options().dtype(at::kBool));
  // Comparisons run in y's dtype, the bounds rounded to it as the kernels do.
  if (shrink > 0) {
    mask = mask.logical_and(y.ne(0));
  }
  if (min.has_value()) {
    mask = mask.logical_and(y.gt(*min));
  }
  if (max.has_value()) {
    mask = mask.logical_and(y.lt(*max));
  }
  return mask;
}

// Systems per batched solve: keeps each chunk's (k, C, C) matrices near
// 16 MiB, so the backward's peak memory stays a few such buffers.
int64_t solve_chunk(int64_t C, int64_t elem_size) {
  const int64_t per = std::max<int64_t>(1, C * C * elem_size);
  return std::max<int64_t>(1, (int64_t{16} << 20) / per);
}

// On the CPU the solver's status is free to read, so a singular active block
// is an error; on other devices reading it would wait for the device, and a
// singular block gives non-finite gradients instead.
void check_info(const at::Tensor& info, int64_t first_row) {
  if (!info.device().is_cpu() || info.numel() == 0) {
    return;
  }
  const at::Tensor bad = info.ne(0).flatten();
  if (!bad.any().item<bool>()) {
    return;
  }
  // One system per row when the active sets differ, else one for all rows.
  const std::string where = info.dim() == 0
      ? std::string("the same block for every sample and position")
      : "the block of row " +
          std::to_string(first_row + bad.to(at::kByte).argmax().item<int64_t>()) +
          " of the batch flattened as (B * spatial)";
  TORCH_CHECK(
      false, kBackwardOp, ": A restricted to the active set is singular (",
      where, "); the fixed point is not differentiable there");
}

// The solves with ATen's linalg_solve_ex, on every device without a kernel of
// its own (the CPU among them).
at::Tensor solve_shared_aten(const at::Tensor& At, const at::Tensor& rhs) {
  auto [sol, info] = at::linalg_solve_ex(At, rhs, /*left=*/true, /*check_errors=*/false);
  check_info(info, 0);
  return sol;
}

at::Tensor solve_per_row_aten(const at::Tensor& M, const at::Tensor& rhs, int64_t first_row) {
  auto [sol, info] = at::linalg_solve_ex(M, rhs.unsqueeze(2), /*left=*/true, /*check_errors=*/false);
  check_info(info, first_row);
  return sol.squeeze(2);
}

std::tuple<at::Tensor, at::Tensor> quadratic_descent_backward_kernel(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& A,
    double shrink, std::optional<double> min, std::optional<double> max) {
  return quadratic_descent_backward_with(
      grad_y, y, A, shrink, min, max, ImplicitSolvers{&solve_shared_aten, &solve_per_row_aten});
}

} // namespace

// Built from ATen ops and the device's solves, so the same code runs on every
// device: batched solves, no per-sample loop, and no host synchronisation
// beyond what the solvers do.
std::tuple<at::Tensor, at::Tensor> quadratic_descent_backward_with(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& A,
    double shrink, std::optional<double> min, std::optional<double> max,
    const ImplicitSolvers& solvers) {
  check_quadratic_descent_backward(grad_y, y, A, shrink, min, max);
  if (is_reduced_float(y.scalar_type())) {
    // The forward ran in float32; so do its solves (a float16 LU would lose
    // most of the gradient's digits), rounded back once.
    auto [grad_A, grad_b] = quadratic_descent_backward_with(
        grad_y.to(at::kFloat), y.to(at::kFloat), A.to(at::kFloat), shrink, min, max, solvers);
    return {grad_A.to(A.scalar_type()), grad_b.to(y.scalar_type())};
  }
  const BatchChannelSpatial s = batch_channel_spatial(y);
  const int64_t n = s.batch * s.spatial;
  at::Tensor grad_A = at::zeros_like(A, at::MemoryFormat::Contiguous);
  if (n == 0 || s.channels == 0) {
    return {grad_A, at::zeros_like(y, at::MemoryFormat::Contiguous)};
  }
  const at::Tensor yr = rows(y, s);
  const at::Tensor gr = rows(grad_y, s);
  const at::Tensor At = A.t();
  at::Tensor x;
  if (shrink == 0 && !min.has_value() && !max.has_value()) {
    // No projection: every entry is active, one solve with n right-hand sides.
    x = solvers.shared(At, gr.t()).t();
  } else {
    // Each row's system is A^T with the held rows and columns replaced by
    // the identity and its right-hand side zeroed there, so x_N = 0 and x_S
    // solves A_SS^T x_S = g_S. Chunks bound the (n, C, C) matrices' memory;
    // chunk sizes are known on the host, so this loop never synchronises.
    const at::Tensor mask = active_mask(yr, shrink, min, max).to(y.scalar_type());
    const at::Tensor rhs = gr * mask;
    const int64_t chunk = solve_chunk(s.channels, y.element_size());
    std::vector<at::Tensor> parts;
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t r1 = std::min(n, r0 + chunk);
      const at::Tensor m = mask.slice(0, r0, r1);
      // Built in place: one (k, C, C) buffer besides the solver's own copy.
      at::Tensor M = m.unsqueeze(2) * m.unsqueeze(1);
      M.mul_(At);
      M.diagonal(0, 1, 2).add_(1 - m);
      parts.push_back(solvers.per_row(M, rhs.slice(0, r0, r1), r0));
    }
    x = parts.size() == 1 ? parts[0] : at::cat(parts, 0);
  }
  grad_A = -at::mm(x.t(), yr);
  return {grad_A, unrows(x, y, s).contiguous()};
}

namespace {

std::tuple<at::Tensor, at::Tensor> quadratic_descent_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& A,
    double shrink, std::optional<double> min, std::optional<double> max) {
  check_quadratic_descent_backward(grad_y, y, A, shrink, min, max);
  return {
      at::empty_symint(A.sym_sizes(), A.options()),
      at::empty_symint(y.sym_sizes(), y.options())};
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
    std::optional<double>, std::optional<double>)>&
backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchiter::quadratic_descent_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
              std::optional<double>, std::optional<double>)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t,
    double, int64_t, const std::optional<at::Tensor>&, double,
    std::optional<double>, std::optional<double>)>&
quadratic_descent_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchiter::quadratic_descent", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
              int64_t, double, int64_t, const std::optional<at::Tensor>&,
              double, std::optional<double>, std::optional<double>)>();
  return op;
}

using ExOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<ExOutputs(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t,
    double, int64_t, const std::optional<at::Tensor>&, double,
    std::optional<double>, std::optional<double>, bool, bool)>&
quadratic_descent_ex_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchiter::quadratic_descent_ex", "")
          .typed<ExOutputs(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
              int64_t, double, int64_t, const std::optional<at::Tensor>&,
              double, std::optional<double>, std::optional<double>, bool, bool)>();
  return op;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the backward of both ops needs: y, A and the projection.
void save_for_implicit_backward(
    AutogradContext* ctx, const at::Tensor& y, const at::Tensor& A, double shrink,
    std::optional<double> min, std::optional<double> max) {
  ctx->save_for_backward({y, A});
  ctx->saved_data["shrink"] = shrink;
  ctx->saved_data["min"] = min;
  ctx->saved_data["max"] = max;
}

// Gradients of the op's inputs (y0, A, b, then `n_options` non-tensor
// arguments) from the gradient of y.
variable_list implicit_backward(AutogradContext* ctx, const at::Tensor& grad_y, size_t n_options) {
  const auto saved = ctx->get_saved_variables();
  const auto to_opt = [](const c10::IValue& v) {
    return v.isNone() ? std::optional<double>() : v.toDouble();
  };
  auto [grad_A, grad_b] = backward_op().call(
      grad_y, saved[0], saved[1], ctx->saved_data["shrink"].toDouble(),
      to_opt(ctx->saved_data["min"]), to_opt(ctx->saved_data["max"]));
  if (!ctx->needs_input_grad(1)) {
    grad_A = at::Tensor();
  }
  if (!ctx->needs_input_grad(2)) {
    grad_b = at::Tensor();
  }
  variable_list grads{at::Tensor(), grad_A, grad_b};
  grads.resize(3 + n_options);
  return grads;
}

class QuadraticDescentFunction
    : public torch::autograd::Function<QuadraticDescentFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& y0, const at::Tensor& A,
      const at::Tensor& b, double lr, int64_t max_iterations, double tol,
      int64_t check_every, const std::optional<at::Tensor>& lrs, double shrink,
      std::optional<double> min, std::optional<double> max) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, iterations] = quadratic_descent_op().call(
        y0, A, b, lr, max_iterations, tol, check_every, lrs, shrink, min, max);
    save_for_implicit_backward(ctx, y, A, shrink, min, max);
    ctx->mark_non_differentiable({iterations});
    return {y, iterations};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return implicit_backward(ctx, grads[0], 8);
  }
};

// quadratic_descent_ex: the same gradient for y (per-sample stopping ends
// each sample at the same fixed point); the statistics are not
// differentiable.
class QuadraticDescentExFunction
    : public torch::autograd::Function<QuadraticDescentExFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& y0, const at::Tensor& A,
      const at::Tensor& b, double lr, int64_t max_iterations, double tol,
      int64_t check_every, const std::optional<at::Tensor>& lrs, double shrink,
      std::optional<double> min, std::optional<double> max, bool per_sample,
      bool trace) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, iterations, converged, change, growth, change_trace] =
        quadratic_descent_ex_op().call(
            y0, A, b, lr, max_iterations, tol, check_every, lrs, shrink, min,
            max, per_sample, trace);
    save_for_implicit_backward(ctx, y, A, shrink, min, max);
    ctx->mark_non_differentiable({iterations, converged, change, growth, change_trace});
    return {y, iterations, converged, change, growth, change_trace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return implicit_backward(ctx, grads[0], 10);
  }
};

std::tuple<at::Tensor, at::Tensor> quadratic_descent_autograd(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    double lr, int64_t max_iterations, double tol, int64_t check_every,
    const std::optional<at::Tensor>& lrs, double shrink,
    std::optional<double> min, std::optional<double> max) {
  if (!at::GradMode::is_enabled() ||
      !(A.requires_grad() || b.requires_grad())) {
    // Nothing to differentiate: skip building a graph node (the models'
    // forward runs here on every call).
    at::AutoDispatchBelowADInplaceOrView guard;
    return quadratic_descent_op().call(
        y0, A, b, lr, max_iterations, tol, check_every, lrs, shrink, min, max);
  }
  // y0 enters detached: the fixed point does not depend on the start.
  auto out = QuadraticDescentFunction::apply(
      y0.detach(), A, b, lr, max_iterations, tol, check_every, lrs, shrink,
      min, max);
  return {out[0], out[1]};
}

ExOutputs quadratic_descent_ex_autograd(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    double lr, int64_t max_iterations, double tol, int64_t check_every,
    const std::optional<at::Tensor>& lrs, double shrink,
    std::optional<double> min, std::optional<double> max, bool per_sample,
    bool trace) {
  if (!at::GradMode::is_enabled() ||
      !(A.requires_grad() || b.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return quadratic_descent_ex_op().call(
        y0, A, b, lr, max_iterations, tol, check_every, lrs, shrink, min, max,
        per_sample, trace);
  }
  auto out = QuadraticDescentExFunction::apply(
      y0.detach(), A, b, lr, max_iterations, tol, check_every, lrs, shrink,
      min, max, per_sample, trace);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

// The backward formula is not differentiated again: differentiating through
// it (create_graph=True, then another backward) raises instead of returning a
// silently wrong second derivative.
class QuadraticDescentBackwardFunction
    : public torch::autograd::Function<QuadraticDescentBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& y,
      const at::Tensor& A, double shrink, std::optional<double> min,
      std::optional<double> max) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_A, grad_b] = backward_op().call(grad_y, y, A, shrink, min, max);
    return {grad_A, grad_b};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(
        false, kBackwardOp,
        ": double backward (differentiating the implicit gradient of "
        "torchiter.quadratic_descent again) is not supported");
  }
};

std::tuple<at::Tensor, at::Tensor> quadratic_descent_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& A,
    double shrink, std::optional<double> min, std::optional<double> max) {
  auto out = QuadraticDescentBackwardFunction::apply(grad_y, y, A, shrink, min, max);
  return {out[0], out[1]};
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, CompositeExplicitAutograd, m) {
  m.impl("quadratic_descent_backward", &quadratic_descent_backward_kernel);
}

TORCH_LIBRARY_IMPL(torchiter, Meta, m) {
  m.impl("quadratic_descent_backward", &quadratic_descent_backward_meta);
}

TORCH_LIBRARY_IMPL(torchiter, Autograd, m) {
  m.impl("quadratic_descent", &quadratic_descent_autograd);
  m.impl("quadratic_descent_ex", &quadratic_descent_ex_autograd);
  m.impl("quadratic_descent_backward", &quadratic_descent_backward_autograd);
}

} // namespace torchiter
