// Entry points of the CPU kernel files (this folder). Each kernel file is
// compiled once per instruction-set variant, with CPU_CAPABILITY naming the
// variant (DEFAULT, AVX2, AVX512) and putting its code, at::vec included, in
// a namespace of that name, as ATen builds its own kernels. Nothing outside
// this folder gets instruction-set flags; the host code calls the variant
// that cpu_kernels() (../capability.h) picked for the running CPU.
#pragma once

#include "../../ops.h"
#include "../../step_plan.h"

#include <string>
#include <tuple>
#include <vector>

namespace torchiter::cpu {

// Services of the host code to the variants, defined in capability.cpp
// (compiled without instruction-set flags): a variant that formatted a
// message or threw through c10's macros would instantiate their inline
// helpers with its own flags, and the linker may hand those copies to host
// code as well (tests/test_cpu_variants.py checks the machine code for it).
enum class AmxRequest { kAuto, kOff, kEmulate, kForce };
// TORCHITER_AMX (auto, 1, 0, emulate or force), read once; throws on
// another value.
AmxRequest amx_request();
// TORCHITER_SPARSE (auto, 1 or 0), read at each call so that a benchmark can
// time the paths in one process: 0 never skips zeros, auto where a sample
// of the batch is sparse enough, 1 wherever the loop allows it; throws on
// another value.
enum class SparseRows { kOff, kAuto, kForce };
SparseRows sparse_rows_request();
// Counts rows run by the AVX2 and AVX-512 kernels' sparse-row drivers (process-wide),
// so that tests can see which driver ran: _C._sparse_rows_count() (both
// drivers), _C._sparse_blocks_count() (run_sparse_blocks alone).
void count_sparse_rows(int64_t rows);
int64_t sparse_rows_count();
void count_sparse_blocks(int64_t rows);
int64_t sparse_blocks_count();
[[noreturn]] void kernel_error(const char* message);
void kernel_warning_once(const char* message);

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
      LearningRates& lrs);                                                  \
  /* What a loop that may mix on bfloat16 products (QuadraticDescentArgs:: \
     bf16_mixing) runs them on: "amx", "amx-emulated", "avx512_bf16", or   \
     "none" (it mixes in float32). */                                       \
  const char* bf16_mixing_units();

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
