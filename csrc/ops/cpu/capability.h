// Run-time choice of the CPU kernels' instruction-set variant.
#pragma once

#include "kernels/kernels.h"

#include <string>
#include <vector>

namespace torchiter::cpu {

// The variants, narrowest first. x86-64 builds hold all three; other
// architectures hold kDefault only (at::vec's portable code).
enum class CpuCapability { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The entry points of one variant.
struct CpuKernels {
  CpuCapability capability;
  decltype(&DEFAULT::sgd_step_kernel) sgd_step;
  decltype(&DEFAULT::quadratic_descent_kernel) quadratic_descent;
  decltype(&DEFAULT::bf16_mixing_units) bf16_mixing_units;
};

// The variant in use, chosen on first use: the widest one that this library
// holds and the running CPU (and OS) supports, or a narrower one named by the
// environment variable TORCHITER_CPU_CAPABILITY (default, avx2, avx512).
const CpuKernels& cpu_kernels();

// "default", "avx2" or "avx512".
std::string capability_name(CpuCapability c);

// The variants this library holds that the running CPU supports, narrowest
// first (whatever TORCHITER_CPU_CAPABILITY says).
std::vector<CpuCapability> supported_capabilities();

} // namespace torchiter::cpu
