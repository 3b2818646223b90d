// Entry points of the CPU kernel files (this folder). Each kernel file is
// compiled once per instruction-set variant, with CPU_CAPABILITY naming the
// variant (DEFAULT, AVX2, AVX512) and putting its code, at::vec included, in
// a namespace of that name, as ATen builds its own kernels. Nothing outside
// this folder gets instruction-set flags; the host code calls the variant
// that cpu_kernels() (../capability.h) picked for the running CPU.
#pragma once

#include "../../ops.h"
#include "../../step_plan.h"

#include <tuple>
#include <vector>

namespace torchiter::cpu {

// Declares the entry points of one variant; a kernel file defines them in
// namespace torchiter::cpu::CPU_CAPABILITY.
#define TORCHITER_CPU_KERNEL_ENTRY_POINTS                                    \
  /* Updates every segment of one dtype, split over the threads. */         \
  void sgd_step_kernel(                                                     \
      at::ScalarType dtype,                                                 \
      const std::vector<StepSegment>& segments,                             \
      const SgdOptions& options);                                           \
  /* The whole loop on checked inputs (y0.numel() > 0, max_iterations >   \
     0); returns y and the iteration count, and with args.stats every      \
     statistic of quadratic_descent_ex. `lrs` gives the rate of each       \
     iteration, read as the loop reaches it. */                            \
  QuadraticDescentResult quadratic_descent_kernel(                          \
      const at::Tensor& y0,                                                 \
      const at::Tensor& A,                                                  \
      const at::Tensor& b,                                                  \
      const QuadraticDescentArgs& args,                                     \
      LearningRates& lrs);

namespace DEFAULT {
TORCHITER_CPU_KERNEL_ENTRY_POINTS
} // namespace DEFAULT
#ifdef TORCHITER_CPU_X86_VARIANTS
namespace AVX2 {
TORCHITER_CPU_KERNEL_ENTRY_POINTS
} // namespace AVX2
namespace AVX512 {
TORCHITER_CPU_KERNEL_ENTRY_POINTS
} // namespace AVX512
#endif

} // namespace torchiter::cpu
