// CPU kernel of torchiter.sgd_step_ (one instruction-set variant, see
// kernels.h): one pass over memory, vectorised with at::vec and parallel over
// the elements of all tensors of one dtype at once, so a list of many small
// tensors shares one parallel region.
#include "kernels.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

// Elements per chunk of the parallel split. Chunks are cut from the
// concatenated segments, so a boundary may fall inside a tensor or between
// two; the update is elementwise and every element, tails included, goes
// through the same vector code (partial loads), so results are bitwise the
// same at any thread count.
constexpr int64_t kChunk = 64;

template <typename scalar_t>
void run_segments(const std::vector<StepSegment>& segs, const SgdOptions& opt) {
  using opmath_t = at::opmath_type<scalar_t>;
  const SgdVecMath<opmath_t> math(opt);
  std::vector<int64_t> starts(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) {
    starts[i + 1] = starts[i] + segs[i].numel;
  }
  const int64_t total = starts.back();
  const int64_t nchunks = (total + kChunk - 1) / kChunk;
  at::parallel_for(
      0, nchunks, at::internal::GRAIN_SIZE / kChunk, [&](int64_t c0, int64_t c1) {
        const int64_t begin = c0 * kChunk;
        const int64_t end = std::min(total, c1 * kChunk);
        size_t s = static_cast<size_t>(
            std::upper_bound(starts.begin(), starts.end(), begin) -
            starts.begin() - 1);
        for (int64_t pos = begin; pos < end && s < segs.size(); ++s) {
          const StepSegment& seg = segs[s];
          const int64_t lo = pos - starts[s];
          const int64_t hi = std::min(seg.numel, end - starts[s]);
          if (hi > lo) {
            dispatch_sgd_flags(opt, [&]<Mom MOM, bool NEST, bool WD, bool SHRINK>() {
              sgd_apply<scalar_t, MOM, NEST, WD, SHRINK>(
                  static_cast<scalar_t*>(seg.param) + lo,
                  static_cast<const scalar_t*>(seg.grad) + lo,
                  seg.buffer ? static_cast<scalar_t*>(seg.buffer) + lo : nullptr,
                  hi - lo,
                  math);
            });
          }
          pos = starts[s + 1];
        }
      });
}

} // namespace

void sgd_step_kernel(
    at::ScalarType dtype,
    const std::vector<StepSegment>& segments,
    const SgdOptions& options) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "torchiter.sgd_step_", [&] {
        run_segments<scalar_t>(segments, options);
      });
}

} // namespace torchiter::cpu::CPU_CAPABILITY
