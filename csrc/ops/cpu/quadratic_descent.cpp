// CPU entry points of torchiter.quadratic_descent and quadratic_descent_ex:
// checks and the host-side learning rates, then the kernel variant picked for
// this CPU (kernels/quadratic_descent.cpp, one build per instruction set).
#include "../ops.h"
#include "capability.h"

#include <ATen/Context.h>
#include <torch/library.h>

namespace torchiter {
namespace {

// Where the loop may mix channels on the CPU's bfloat16 dot products (the
// kernel uses them where the CPU has them, from a few dozen channels on):
// - a bfloat16 loop (run in float32): A is exactly representable, and y is
//   rounded to the model's own dtype for the product only;
// - a float32 loop while PyTorch's float32 matmul precision allows bfloat16
//   on the CPU (torch.set_float32_matmul_precision("medium"), or
//   torch.backends.mkldnn.matmul.fp32_precision = "bf16"), as it does for
//   torch.mm itself: A and y's inputs to the product are rounded to bfloat16.
// Not float16: its values are not bfloat16 values, and bfloat16 products
// would lose precision it has. float64 never.
QuadraticDescentArgs with_mixing_precision(QuadraticDescentArgs args, at::ScalarType dtype) {
  args.bf16_mixing = args.bf16_mixing || dtype == at::kBFloat16 ||
      (dtype == at::kFloat &&
       at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL) ==
           at::Float32Precision::BF16);
  return args;
}

std::tuple<at::Tensor, at::Tensor> quadratic_descent_cpu(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  check_quadratic_descent(y0, A, b, lrs, args, kLoopDtypes);
  TORCH_CHECK(
      y0.device().is_cpu(), "torchiter.quadratic_descent: the CPU kernel got y0 on ",
      y0.device());
  // A bad TORCHITER_SPARSE is refused on every CPU call, loop or not.
  cpu::sparse_rows_request();
  if (is_reduced_float(y0.scalar_type())) {
    const QuadraticDescentArgs loop_args = with_mixing_precision(args, y0.scalar_type());
    return with_float32_loop(y0.detach(), A.detach(), b.detach(), [&](const auto& y, const auto& a, const auto& c) {
      return quadratic_descent_cpu(y, a, c, lrs, loop_args);
    });
  }
  LearningRates host_lrs(lrs, args);
  at::Tensor y0d = y0.detach();
  if (y0.numel() == 0) {
    return {y0d.clone(at::MemoryFormat::Contiguous),
            at::scalar_tensor(args.max_iterations, y0.options().dtype(at::kLong))};
  }
  auto r = cpu::cpu_kernels().quadratic_descent(
      y0d, A.detach(), b.detach(), with_mixing_precision(args, y0.scalar_type()), host_lrs);
  return {r.y, r.iterations};
}

QuadraticDescentResult quadratic_descent_ex_cpu(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  check_quadratic_descent(y0, A, b, lrs, args, kLoopDtypes);
  TORCH_CHECK(
      y0.device().is_cpu(), "torchiter.quadratic_descent_ex: the CPU kernel got y0 on ",
      y0.device());
  cpu::sparse_rows_request();
  if (y0.numel() == 0 || args.max_iterations == 0) {
    // Nothing runs: the generic driver's answer, without a loop.
    return quadratic_descent_ex_generic(y0, A, b, lrs, args, &quadratic_descent_cpu);
  }
  if (is_reduced_float(y0.scalar_type())) {
    const QuadraticDescentArgs loop_args = with_mixing_precision(args, y0.scalar_type());
    return with_float32_loop_ex(y0.detach(), A.detach(), b.detach(), [&](const auto& y, const auto& a, const auto& c) {
      return quadratic_descent_ex_cpu(y, a, c, lrs, loop_args);
    });
  }
  LearningRates host_lrs(lrs, args);
  return cpu::cpu_kernels().quadratic_descent(
      y0.detach(), A.detach(), b.detach(), with_mixing_precision(args, y0.scalar_type()), host_lrs);
}

// The device-generic driver (what the CUDA kernel runs) on the CPU, so that
// its logic is tested on every machine against the CPU kernel.
QuadraticDescentResult quadratic_descent_ex_generic_cpu(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  check_quadratic_descent(y0, A, b, lrs, args, kLoopDtypes);
  if (is_reduced_float(y0.scalar_type())) {
    return with_float32_loop_ex(y0.detach(), A.detach(), b.detach(), [&](const auto& y, const auto& a, const auto& c) {
      return quadratic_descent_ex_generic_cpu(y, a, c, lrs, args);
    });
  }
  return quadratic_descent_ex_generic(
      y0.detach(), A.detach(), b.detach(), lrs, args, &quadratic_descent_cpu);
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, CPU, m) {
  m.impl("quadratic_descent", &quadratic_descent_entry<&quadratic_descent_cpu>);
  m.impl("quadratic_descent_ex", &quadratic_descent_ex_entry<&quadratic_descent_ex_cpu>);
  m.impl("_quadratic_descent_ex_generic",
         &quadratic_descent_ex_entry<&quadratic_descent_ex_generic_cpu>);
}

} // namespace torchiter
