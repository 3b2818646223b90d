// Meta kernel of torchiter.quadratic_descent: checks the inputs and returns
// outputs of the right shape, dtype and device (a contiguous y of y0's shape
// and a 0-dim int64 iteration count) without running the loop.
#include "../ops.h"

#include <torch/library.h>

namespace torchiter {
namespace {

std::tuple<at::Tensor, at::Tensor> quadratic_descent_meta(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  check_quadratic_descent(y0, A, b, lrs, args, {at::kFloat, at::kDouble});
  return {
      at::empty_symint(y0.sym_sizes(), y0.options()),
      at::empty({}, y0.options().dtype(at::kLong))};
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, Meta, m) {
  m.impl("quadratic_descent", &quadratic_descent_entry<&quadratic_descent_meta>);
}

} // namespace torchiter
