// Picks the instruction-set variant of the CPU kernels once, when a kernel
// first runs, like ATen's DispatchStub picks its CPU_CAPABILITY. This file is
// compiled for plain x86-64 (it runs before anything is known about the CPU).
#include "capability.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>

namespace torchiter::cpu {
namespace {

#ifdef TORCHITER_CPU_X86_VARIANTS
// Only the x86 variant build asks (a default-only build has nothing to pick).
bool cpu_supports(CpuCapability c) {
#if defined(__GNUC__) || defined(__clang__)
  // __builtin_cpu_supports also checks that the OS saves the wide registers.
  __builtin_cpu_init();
  switch (c) {
    case CpuCapability::kAvx512:
      // The extensions ATen's AVX512 at::vec code (and -mavx512* here) uses.
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuCapability::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
          __builtin_cpu_supports("f16c");
    case CpuCapability::kDefault:
      return true;
  }
  return false;
#else
  return c == CpuCapability::kDefault;
#endif
}
#endif

CpuKernels kernels_of(CpuCapability c) {
  switch (c) {
#ifdef TORCHITER_CPU_X86_VARIANTS
    case CpuCapability::kAvx512:
      return {c, &AVX512::sgd_step_kernel, &AVX512::quadratic_descent_kernel, &AVX512::bf16_mixing_units};
    case CpuCapability::kAvx2:
      return {c, &AVX2::sgd_step_kernel, &AVX2::quadratic_descent_kernel, &AVX2::bf16_mixing_units};
#endif
    default:
      return {CpuCapability::kDefault, &DEFAULT::sgd_step_kernel, &DEFAULT::quadratic_descent_kernel,
              &DEFAULT::bf16_mixing_units};
  }
}

CpuKernels choose() {
  const std::vector<CpuCapability> supported = supported_capabilities();
  CpuCapability chosen = supported.back();
  if (const char* env = std::getenv("TORCHITER_CPU_CAPABILITY"); env && *env) {
    std::string want(env);
    std::transform(want.begin(), want.end(), want.begin(), [](unsigned char ch) {
      return static_cast<char>(std::tolower(ch));
    });
    bool known = false;
    for (CpuCapability c : {CpuCapability::kDefault, CpuCapability::kAvx2, CpuCapability::kAvx512}) {
      if (want == capability_name(c)) {
        known = true;
        // Only ever narrower: a variant the CPU cannot run would crash.
        chosen = std::min(chosen, c);
        if (c > chosen) {
          TORCH_WARN(
              "torchiter: TORCHITER_CPU_CAPABILITY=", env, " is not supported by this CPU or build; using ",
              capability_name(chosen));
        }
      }
    }
    TORCH_CHECK(
        known, "torchiter: TORCHITER_CPU_CAPABILITY must be one of default, avx2, avx512, got '", env, "'");
  }
  return kernels_of(chosen);
}

} // namespace

std::string capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::kAvx512:
      return "avx512";
    case CpuCapability::kAvx2:
      return "avx2";
    case CpuCapability::kDefault:
      break;
  }
  return "default";
}

std::vector<CpuCapability> supported_capabilities() {
  std::vector<CpuCapability> out{CpuCapability::kDefault};
#ifdef TORCHITER_CPU_X86_VARIANTS
  for (CpuCapability c : {CpuCapability::kAvx2, CpuCapability::kAvx512}) {
    if (cpu_supports(c)) {
      out.push_back(c);
    }
  }
#endif
  return out;
}

AmxRequest amx_request() {
  static const AmxRequest request = [] {
    const char* env = std::getenv("TORCHITER_AMX");
    const std::string want = env && *env ? env : "auto";
    if (want == "auto" || want == "1") {
      return AmxRequest::kAuto;
    }
    if (want == "0") {
      return AmxRequest::kOff;
    }
    if (want == "force") {
      return AmxRequest::kForce;
    }
    TORCH_CHECK(
        want == "emulate", "torchiter: TORCHITER_AMX must be one of auto, 1, 0, emulate, force, got '", want, "'");
    return AmxRequest::kEmulate;
  }();
  return request;
}

SparseRows sparse_rows_request() {
  const char* env = std::getenv("TORCHITER_SPARSE");
  const std::string want = env && *env ? env : "auto";
  TORCH_CHECK(
      want == "auto" || want == "1" || want == "0",
      "torchiter: TORCHITER_SPARSE must be one of auto, 1, 0, got '", want, "'");
  return want == "0" ? SparseRows::kOff : want == "1" ? SparseRows::kForce : SparseRows::kAuto;
}

namespace {
std::atomic<int64_t> sparse_rows_total{0};
std::atomic<int64_t> sparse_blocks_total{0};
} // namespace

void count_sparse_blocks(int64_t rows) {
  sparse_blocks_total.fetch_add(rows, std::memory_order_relaxed);
}

int64_t sparse_blocks_count() {
  return sparse_blocks_total.load(std::memory_order_relaxed);
}

void count_sparse_rows(int64_t rows) {
  sparse_rows_total.fetch_add(rows, std::memory_order_relaxed);
}

int64_t sparse_rows_count() {
  return sparse_rows_total.load(std::memory_order_relaxed);
}

void kernel_error(const char* message) {
  TORCH_CHECK(false, message);
}

void kernel_warning_once(const char* message) {
  TORCH_WARN_ONCE(message);
}

const CpuKernels& cpu_kernels() {
  // Thread-safe one-time initialisation; a bad environment value throws here
  // (and again on the next call) with the message above.
  static const CpuKernels kernels = choose();
  return kernels;
}

} // namespace torchiter::cpu
