// The segment planner of sgd_step_, shared by the CPU and CUDA kernels
// (header-only, plain C++ on ATen, so nvcc's host compiler builds it too).
//
// A step walks every tensor as a flat array. Tensors whose param, grad and
// buffer cover dense memory in one element order are walked in place; the
// others get dense working copies, walked with the rest and written back
// through the caller's strides afterwards, so nothing is left stale. Segments
// are grouped by dtype so that one parallel region (CPU) or one launch series
// (CUDA) covers all tensors of a dtype.
#pragma once

#include "ops.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace torchiter {

// One tensor's memory seen as a flat array (dense, same strides for all three).
struct StepSegment {
  void* param;
  const void* grad;
  void* buffer; // null without momentum
  int64_t numel;
};

class StepPlan {
 public:
  // Plans a step over the lists (already checked by check_sgd_step).
  StepPlan(
      at::TensorList params,
      at::TensorList grads,
      at::TensorList bufs,
      bool with_buffers) {
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& p = params[i];
      const at::Tensor* buf = with_buffers ? &bufs[i] : nullptr;
      if (p.numel() == 0) {
        continue;
      }
      if (same_dense_layout(p, grads[i], buf)) {
        add(p.scalar_type(),
            {p.data_ptr(), grads[i].const_data_ptr(),
             buf ? buf->data_ptr() : nullptr, p.numel()});
        continue;
      }
      at::Tensor pw = p.is_contiguous() ? p : p.contiguous();
      at::Tensor gw = grads[i].contiguous();
      at::Tensor bw;
      if (buf) {
        bw = buf->is_contiguous() ? *buf : buf->contiguous();
      }
      add(p.scalar_type(),
          {pw.data_ptr(), gw.const_data_ptr(), buf ? bw.data_ptr() : nullptr,
           pw.numel()});
      if (!pw.is_same(p)) {
        write_back_.push_back({p, pw});
      }
      if (buf && !bw.is_same(*buf)) {
        write_back_.push_back({*buf, bw});
      }
      // Working copies stay referenced until the plan is gone: on CUDA,
      // freed earlier, their memory could be reused before the launch runs.
      keep_alive_.push_back(std::move(gw));
    }
  }

  // The segments of each dtype, in list order.
  const std::vector<std::pair<at::ScalarType, std::vector<StepSegment>>>&
  groups() const {
    return groups_;
  }

  // Copies the working copies back into the caller's tensors; call after
  // every group has run (on CUDA: been enqueued on the current stream).
  void write_back() const {
    for (const auto& [dst, src] : write_back_) {
      // Tensor::copy_ is a const member: it writes through dst's strides.
      dst.copy_(src);
    }
  }

 private:
  void add(at::ScalarType dtype, const StepSegment& seg) {
    auto it = std::find_if(groups_.begin(), groups_.end(), [&](const auto& g) {
      return g.first == dtype;
    });
    if (it == groups_.end()) {
      groups_.push_back({dtype, {seg}});
    } else {
      it->second.push_back(seg);
    }
  }

  std::vector<std::pair<at::ScalarType, std::vector<StepSegment>>> groups_;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back_;
  std::vector<at::Tensor> keep_alive_;
};

} // namespace torchiter
