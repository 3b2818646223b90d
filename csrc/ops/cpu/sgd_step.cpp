// CPU kernel of torchiter.sgd_step_: one pass over memory, vectorised with
// at::vec and parallel over the elements of all tensors of one dtype at once,
// so a list of many small tensors shares one parallel region.
#include "../ops.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace torchiter {
namespace {

using at::vec::Vectorized;

// One tensor's memory seen as a flat array (dense, same strides for all three).
struct Segment {
  void* p;
  const void* g;
  void* buf; // null without momentum
  int64_t n;
};

template <typename scalar_t>
void run_segments(const std::vector<Segment>& segs, const SgdOptions& opt) {
  using opmath_t = at::opmath_type<scalar_t>;
  const SgdVecMath<opmath_t> math(opt);
  std::vector<int64_t> starts(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) {
    starts[i + 1] = starts[i] + segs[i].n;
  }
  // Chunks are aligned to the vector width so that, whatever the thread count,
  // every element goes through the same full-width vector code (bitwise-stable).
  constexpr int64_t kAlign = 64;
  const int64_t total = starts.back();
  const int64_t nchunks = (total + kAlign - 1) / kAlign;
  at::parallel_for(
      0, nchunks, at::internal::GRAIN_SIZE / kAlign, [&](int64_t c0, int64_t c1) {
        const int64_t begin = c0 * kAlign;
        const int64_t end = std::min(total, c1 * kAlign);
        size_t s = static_cast<size_t>(
            std::upper_bound(starts.begin(), starts.end(), begin) -
            starts.begin() - 1);
        for (int64_t pos = begin; pos < end && s < segs.size(); ++s) {
          const Segment& seg = segs[s];
          const int64_t lo = pos - starts[s];
          const int64_t hi = std::min(seg.n, end - starts[s]);
          if (hi > lo) {
            dispatch_sgd_flags(opt, [&]<Mom MOM, bool NEST, bool WD, bool SHRINK>() {
              sgd_apply<scalar_t, MOM, NEST, WD, SHRINK>(
                  static_cast<scalar_t*>(seg.p) + lo,
                  static_cast<const scalar_t*>(seg.g) + lo,
                  seg.buf ? static_cast<scalar_t*>(seg.buf) + lo : nullptr,
                  hi - lo,
                  math);
            });
          }
          pos = starts[s + 1];
        }
      });
}

void sgd_step_cpu_impl(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList bufs,
    const SgdOptions& opt) {
  const bool with_buf = opt.momentum != 0;
  // Group the flat-walkable tensors by dtype; the others go through a dense
  // copy whose result is written back through the param's own strides.
  std::vector<std::pair<at::ScalarType, std::vector<Segment>>> groups;
  std::vector<size_t> irregular;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor* buf = with_buf ? &bufs[i] : nullptr;
    if (params[i].numel() == 0) {
      continue;
    }
    if (!same_dense_layout(params[i], grads[i], buf)) {
      irregular.push_back(i);
      continue;
    }
    Segment seg{
        params[i].data_ptr(),
        grads[i].const_data_ptr(),
        buf ? buf->data_ptr() : nullptr,
        params[i].numel()};
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& gr) {
      return gr.first == params[i].scalar_type();
    });
    if (it == groups.end()) {
      groups.push_back({params[i].scalar_type(), {seg}});
    } else {
      it->second.push_back(seg);
    }
  }
  for (const auto& [dtype, segs] : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dtype, "torchiter.sgd_step_", [&] {
          run_segments<scalar_t>(segs, opt);
        });
  }
  for (size_t i : irregular) {
    // A dense working copy where needed; its result is written back through
    // the caller's strides, so nothing is left stale.
    const at::Tensor& p = params[i];
    at::Tensor pw = p.is_contiguous() ? p : p.contiguous();
    at::Tensor g = grads[i].contiguous();
    at::Tensor bw;
    if (with_buf) {
      bw = bufs[i].is_contiguous() ? bufs[i] : bufs[i].contiguous();
    }
    Segment seg{pw.data_ptr(), g.const_data_ptr(),
                with_buf ? bw.data_ptr() : nullptr, pw.numel()};
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, pw.scalar_type(), "torchiter.sgd_step_", [&] {
          run_segments<scalar_t>({seg}, opt);
        });
    if (!pw.is_same(p)) {
      p.copy_(pw);
    }
    if (with_buf && !bw.is_same(bufs[i])) {
      bufs[i].copy_(bw);
    }
  }
}

void sgd_step_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    double lr, double momentum, double dampening, double weight_decay,
    bool nesterov, bool maximize, bool first_step, double shrink,
    std::optional<double> min, std::optional<double> max) {
  const SgdOptions opt{lr, momentum, dampening, weight_decay, nesterov,
                       maximize, first_step, shrink, min, max};
  check_sgd_step(params, grads, bufs, opt);
  TORCH_CHECK(
      params.empty() || params[0].device().is_cpu(),
      "torchiter.sgd_step_: the CPU kernel got tensors on ", params[0].device());
  sgd_step_cpu_impl(params, grads, bufs, opt);
}

void sgd_step_tensor_lr_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    const at::Tensor& lr, double momentum, double dampening,
    double weight_decay, bool nesterov, bool maximize, bool first_step,
    double shrink, std::optional<double> min, std::optional<double> max) {
  check_sgd_lr_tensor(params, lr, /*check_value=*/true);
  sgd_step_cpu(
      params, grads, bufs, lr.item<double>(), momentum, dampening,
      weight_decay, nesterov, maximize, first_step, shrink, min, max);
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, CPU, m) {
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("sgd_step_.tensor_lr", &sgd_step_tensor_lr_cpu);
}

} // namespace torchiter
