// Meta kernel of torchiter.quadratic_descent: checks the inputs and returns
// outputs of the right shape, dtype and device (a contiguous y of y0's shape
// and a 0-dim int64 iteration count; quadratic_descent_ex's statistics)
// without running the loop.
#include "../ops.h"

#include <torch/library.h>

namespace torchiter {
namespace {

std::tuple<at::Tensor, at::Tensor> quadratic_descent_meta(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  check_quadratic_descent(y0, A, b, lrs, args, kLoopDtypes);
  return {
      at::empty_symint(y0.sym_sizes(), y0.options()),
      at::empty({}, y0.options().dtype(at::kLong))};
}

QuadraticDescentResult quadratic_descent_ex_meta(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  check_quadratic_descent(y0, A, b, lrs, args, kLoopDtypes);
  std::vector<c10::SymInt> stat_shape;
  if (args.per_sample) {
    stat_shape.push_back(y0.sym_size(0));
  }
  const auto stat = [&](const at::TensorOptions& o) { return at::empty_symint(stat_shape, o); };
  return {
      at::empty_symint(y0.sym_sizes(), y0.options()),
      stat(y0.options().dtype(at::kLong)),
      stat(y0.options().dtype(at::kBool)),
      stat(y0.options()),
      stat(y0.options()),
      at::empty({args.trace ? args.max_iterations : 0}, y0.options())};
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, Meta, m) {
  m.impl("quadratic_descent", &quadratic_descent_entry<&quadratic_descent_meta>);
  m.impl("quadratic_descent_ex", &quadratic_descent_ex_entry<&quadratic_descent_ex_meta>);
}

} // namespace torchiter
