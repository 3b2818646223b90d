// Input checks shared by every kernel of every op family. They run before any
// tensor is written, so a rejected call leaves params and buffers bitwise
// unchanged.
#include "ops.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>

namespace torchiter {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
      t == at::kBFloat16;
}

void check_finite_option(const char* op, const char* name, double v) {
  TORCH_CHECK(
      std::isfinite(v), op, ": ", name, " must be a finite number, got ", v);
}

void check_bounds(
    const char* op,
    double shrink,
    const std::optional<double>& min,
    const std::optional<double>& max) {
  check_finite_option(op, "shrink", shrink);
  TORCH_CHECK(shrink >= 0, op, ": shrink must be >= 0, got ", shrink);
  TORCH_CHECK(!min || !std::isnan(*min), op, ": min must not be NaN");
  TORCH_CHECK(!max || !std::isnan(*max), op, ": max must not be NaN");
  TORCH_CHECK(
      !(min && max) || *min <= *max,
      op, ": min must be <= max, got min=", *min, " and max=", *max);
}

// Checks one companion tensor (a grad or a momentum buffer) against its param.
void check_companion(
    const char* list,
    size_t i,
    const at::Tensor& t,
    const at::Tensor& p) {
  constexpr const char* op = "torchiter.sgd_step_";
  TORCH_CHECK(t.defined(), op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(
      t.layout() == at::kStrided, op, ": ", list, "[", i,
      "] must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK(
      t.sym_sizes() == p.sym_sizes(), op, ": ", list, "[", i, "] has shape ",
      t.sym_sizes(), " but params[", i, "] has shape ", p.sym_sizes());
  TORCH_CHECK(
      t.scalar_type() == p.scalar_type(), op, ": ", list, "[", i,
      "] has dtype ", t.scalar_type(), " but params[", i, "] has dtype ",
      p.scalar_type());
  TORCH_CHECK(
      t.device() == p.device(), op, ": ", list, "[", i, "] is on ",
      t.device(), " but params[", i, "] is on ", p.device());
}

} // namespace

void check_sgd_step(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList bufs,
    const SgdOptions& o) {
  constexpr const char* op = "torchiter.sgd_step_";
  check_finite_option(op, "lr", o.lr);
  check_finite_option(op, "momentum", o.momentum);
  check_finite_option(op, "dampening", o.dampening);
  check_finite_option(op, "weight_decay", o.weight_decay);
  TORCH_CHECK(o.lr >= 0, op, ": lr must be >= 0, got ", o.lr);
  TORCH_CHECK(
      o.momentum >= 0, op, ": momentum must be >= 0, got ", o.momentum);
  TORCH_CHECK(
      o.weight_decay >= 0, op, ": weight_decay must be >= 0, got ",
      o.weight_decay);
  TORCH_CHECK(
      !o.nesterov || (o.momentum > 0 && o.dampening == 0), op,
      ": nesterov requires momentum > 0 and dampening == 0, got momentum=",
      o.momentum, " and dampening=", o.dampening);
  check_bounds(op, o.shrink, o.min, o.max);

  TORCH_CHECK(
      grads.size() == params.size(), op, ": grads has ", grads.size(),
      " tensors but params has ", params.size());
  if (o.momentum == 0) {
    TORCH_CHECK(
        bufs.empty(), op,
        ": momentum_buffers must be empty when momentum == 0, got ",
        bufs.size(), " tensors");
  } else {
    TORCH_CHECK(
        bufs.size() == params.size(), op, ": momentum_buffers has ",
        bufs.size(), " tensors but params has ", params.size(),
        " (one buffer per param is needed when momentum != 0)");
  }

  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(
        p.layout() == at::kStrided, op, ": params[", i,
        "] must be a dense (strided) tensor, got layout ", p.layout());
    TORCH_CHECK(
        is_supported_float(p.scalar_type()), op, ": params[", i,
        "] has dtype ", p.scalar_type(),
        " but float32, float64, float16 or bfloat16 is expected");
    TORCH_CHECK(
        p.device() == params[0].device(), op, ": params[", i, "] is on ",
        p.device(), " but params[0] is on ", params[0].device(),
        " (all tensors must live on one device)");
    TORCH_CHECK(
        at::has_internal_overlap(p) != at::MemOverlap::Yes, op, ": params[",
        i, "] has overlapping memory (an expanded view?) and cannot be "
        "updated in place");
    check_companion("grads", i, grads[i], p);
    if (!bufs.empty()) {
      check_companion("momentum_buffers", i, bufs[i], p);
      TORCH_CHECK(
          at::has_internal_overlap(bufs[i]) != at::MemOverlap::Yes, op,
          ": momentum_buffers[", i, "] has overlapping memory and cannot be "
          "updated in place");
    }
  }
}

void check_sgd_lr_tensor(
    at::TensorList params,
    const at::Tensor& lr,
    bool check_value) {
  constexpr const char* op = "torchiter.sgd_step_";
  TORCH_CHECK(lr.defined(), op, ": lr is undefined");
  TORCH_CHECK(
      lr.dim() == 0, op, ": lr must be a 0-dim tensor, got shape ",
      lr.sym_sizes());
  TORCH_CHECK(
      at::isFloatingType(lr.scalar_type()), op,
      ": lr must be a floating tensor, got dtype ", lr.scalar_type());
  if (!params.empty()) {
    TORCH_CHECK(
        lr.device() == params[0].device(), op, ": lr is on ", lr.device(),
        " but params[0] is on ", params[0].device());
  }
  if (check_value) {
    const double v = lr.item<double>();
    TORCH_CHECK(
        std::isfinite(v) && v >= 0, op,
        ": lr must be a finite number >= 0, got ", v);
  }
}

void check_quadratic_descent(
    const at::Tensor& y0,
    const at::Tensor& A,
    const at::Tensor& b,
    const std::optional<at::Tensor>& lrs,
    const QuadraticDescentArgs& a,
    c10::ArrayRef<at::ScalarType> supported) {
  constexpr const char* op = "torchiter.quadratic_descent";
  TORCH_CHECK(y0.defined() && A.defined() && b.defined(), op,
      ": y0, A and b must be defined tensors");
  for (const auto* t : {&y0, &A, &b}) {
    TORCH_CHECK(t->layout() == at::kStrided, op,
        ": y0, A and b must be dense (strided) tensors, got layout ",
        t->layout());
  }
  TORCH_CHECK(
      y0.dim() >= 2, op,
      ": y0 must have shape (B, C, *spatial) with at least 2 dims, got shape ",
      y0.sym_sizes());
  TORCH_CHECK(
      at::isFloatingType(y0.scalar_type()), op,
      ": y0 must be a floating tensor, got dtype ", y0.scalar_type());
  bool dtype_ok = false;
  for (auto t : supported) {
    dtype_ok = dtype_ok || t == y0.scalar_type();
  }
  TORCH_CHECK(
      dtype_ok, op, ": dtype ", y0.scalar_type(), " is not supported on ",
      y0.device().type(), "; expected one of ", supported);
  TORCH_CHECK(
      A.scalar_type() == y0.scalar_type() &&
          b.scalar_type() == y0.scalar_type(),
      op, ": y0, A and b must share one dtype, got y0 ", y0.scalar_type(),
      ", A ", A.scalar_type(), ", b ", b.scalar_type());
  TORCH_CHECK(
      A.device() == y0.device() && b.device() == y0.device(), op,
      ": y0, A and b must live on one device, got y0 on ", y0.device(),
      ", A on ", A.device(), ", b on ", b.device());
  // Sym sizes: the Meta kernel runs these checks under dynamic shapes too.
  const c10::SymInt& C = y0.sym_size(1);
  TORCH_CHECK(
      A.dim() == 2 && A.sym_size(0) == C && A.sym_size(1) == C, op,
      ": A must have shape (C, C) = [", C, ", ", C,
      "] where C = y0.size(1), got shape ", A.sym_sizes());
  TORCH_CHECK(
      b.sym_sizes() == y0.sym_sizes(), op, ": b has shape ", b.sym_sizes(),
      " but y0 has shape ", y0.sym_sizes());
  check_finite_option(op, "lr", a.lr);
  TORCH_CHECK(a.lr >= 0, op, ": lr must be >= 0, got ", a.lr);
  TORCH_CHECK(
      a.max_iterations >= 0, op, ": max_iterations must be >= 0, got ",
      a.max_iterations);
  TORCH_CHECK(
      !std::isnan(a.tol) && a.tol >= 0, op, ": tol must be >= 0, got ",
      a.tol);
  TORCH_CHECK(
      a.check_every >= 1, op, ": check_every must be >= 1, got ",
      a.check_every);
  check_bounds(op, a.shrink, a.min, a.max);
  if (lrs.has_value() && lrs->defined()) {
    const at::Tensor& l = *lrs;
    TORCH_CHECK(
        at::isFloatingType(l.scalar_type()), op,
        ": lrs must be a floating tensor, got dtype ", l.scalar_type());
    TORCH_CHECK(
        l.dim() == 1, op, ": lrs must be 1-D, got shape ", l.sym_sizes());
    TORCH_CHECK(
        l.sym_numel() >= a.max_iterations, op, ": lrs has ", l.sym_numel(),
        " entries but max_iterations is ", a.max_iterations);
  }
}

std::vector<double> host_learning_rates(
    const std::optional<at::Tensor>& lrs,
    const QuadraticDescentArgs& a) {
  std::vector<double> out(static_cast<size_t>(a.max_iterations), a.lr);
  if (lrs.has_value() && lrs->defined() && a.max_iterations > 0) {
    at::Tensor h = lrs->detach()
                       .narrow(0, 0, a.max_iterations)
                       .to(at::kCPU, at::kDouble)
                       .contiguous();
    const double* p = h.const_data_ptr<double>();
    for (int64_t k = 0; k < a.max_iterations; ++k) {
      TORCH_CHECK(
          std::isfinite(p[k]) && p[k] >= 0, "torchiter.quadratic_descent: ",
          "lrs[", k, "] must be a finite number >= 0, got ", p[k]);
      out[static_cast<size_t>(k)] = p[k];
    }
  }
  return out;
}

bool same_dense_layout(
    const at::Tensor& p,
    const at::Tensor& g,
    const at::Tensor* buf) {
  if (!p.is_non_overlapping_and_dense()) {
    return false;
  }
  if (p.is_contiguous() && g.is_contiguous() && (!buf || buf->is_contiguous())) {
    return true;
  }
  return g.strides() == p.strides() && (!buf || buf->strides() == p.strides());
}

} // namespace torchiter
