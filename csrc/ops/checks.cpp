// Input checks shared by every kernel of every op family. They run before any
// tensor is written, so a rejected call leaves params and buffers bitwise
// unchanged.
#include "ops.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string_view>

namespace torchiter {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
      t == at::kBFloat16;
}

void check_finite_option(const char* op, const char* name, double v) {
  TORCH_CHECK(
      std::isfinite(v), op, ": ", name, " must be a finite number, got ", v);
}

void check_bounds(
    const char* op,
    double shrink,
    const std::optional<double>& min,
    const std::optional<double>& max) {
  check_finite_option(op, "shrink", shrink);
  TORCH_CHECK(shrink >= 0, op, ": shrink must be >= 0, got ", shrink);
  TORCH_CHECK(!min || !std::isnan(*min), op, ": min must not be NaN");
  TORCH_CHECK(!max || !std::isnan(*max), op, ": max must not be NaN");
  TORCH_CHECK(
      !(min && max) || *min <= *max,
      op, ": min must be <= max, got min=", *min, " and max=", *max);
}

// Checks one companion tensor (a grad or a momentum buffer) against its param.
void check_companion(
    const char* list,
    size_t i,
    const at::Tensor& t,
    const at::Tensor& p) {
  constexpr const char* op = "torchiter.sgd_step_";
  TORCH_CHECK(t.defined(), op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(
      t.layout() == at::kStrided, op, ": ", list, "[", i,
      "] must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK(
      t.sym_sizes() == p.sym_sizes(), op, ": ", list, "[", i, "] has shape ",
      t.sym_sizes(), " but params[", i, "] has shape ", p.sym_sizes());
  TORCH_CHECK(
      t.scalar_type() == p.scalar_type(), op, ": ", list, "[", i,
      "] has dtype ", t.scalar_type(), " but params[", i, "] has dtype ",
      p.scalar_type());
  TORCH_CHECK(
      t.device() == p.device(), op, ": ", list, "[", i, "] is on ",
      t.device(), " but params[", i, "] is on ", p.device());
}


// ---- Memory overlap ---------------------------------------------------------
// ATen's has_internal_overlap / get_overlap_status answer "too hard" for any
// view that is not dense (a slice, an as_strided view), which is exactly where
// silent aliasing hides. The checks below are exact: a cheap sufficient test
// first, and an element-by-element comparison of byte offsets only for the
// rare views that fail it. They read sizes and strides only, never data, so
// they cost no device synchronisation.

bool symbolic(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// Byte offsets (from the storage start) of every element of t, sorted.
std::vector<int64_t> element_offsets(const at::Tensor& t) {
  const int64_t itemsize = static_cast<int64_t>(t.element_size());
  std::vector<int64_t> offs;
  offs.reserve(static_cast<size_t>(t.numel()));
  const int64_t nd = t.dim();
  std::vector<int64_t> idx(static_cast<size_t>(nd), 0);
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  int64_t off = t.storage_offset();
  for (int64_t n = 0; n < t.numel(); ++n) {
    offs.push_back(off * itemsize);
    for (int64_t d = nd - 1; d >= 0; --d) {
      if (++idx[d] < sizes[d]) {
        off += strides[d];
        break;
      }
      off -= (sizes[d] - 1) * strides[d];
      idx[d] = 0;
    }
  }
  std::sort(offs.begin(), offs.end());
  return offs;
}

// True when some element of t is also another element of t.
bool overlaps_itself(const at::Tensor& t) {
  if (t.numel() <= 1) {
    return false;
  }
  const auto quick = at::has_internal_overlap(t);
  if (quick != at::MemOverlap::TooHard) {
    return quick == at::MemOverlap::Yes;
  }
  // Sufficient for no overlap: with the dims ordered by stride, each stride
  // exceeds the span of all smaller ones (true of every slice of a dense
  // tensor).
  c10::SmallVector<std::pair<int64_t, int64_t>, 8> dims; // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) {
      dims.emplace_back(t.stride(d), t.size(d));
    }
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0; // largest offset reachable with the smaller dims
  bool separated = true;
  for (const auto& [stride, size] : dims) {
    if (stride <= span) {
      separated = false;
      break;
    }
    span += (size - 1) * stride;
  }
  if (separated) {
    return false;
  }
  const auto offs = element_offsets(t);
  return std::adjacent_find(offs.begin(), offs.end()) != offs.end();
}

// One tensor of a call as a byte range of its storage.
struct MemoryRange {
  const void* storage;
  int64_t begin, end; // bytes, [begin, end)
  const at::Tensor* t;
  const char* list;
  size_t index;
  bool written;
};

// Whether two tensors of one storage whose byte ranges intersect have an
// element in common. Dense tensors fill their range, so only views with gaps
// (slices, strided views) need the element-by-element comparison.
bool share_elements(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense()) {
    return true;
  }
  const int64_t ia = static_cast<int64_t>(a.element_size());
  const int64_t ib = static_cast<int64_t>(b.element_size());
  const auto oa = element_offsets(a);
  const auto ob = element_offsets(b);
  // Merge the two sorted lists of [offset, offset + itemsize) intervals; an
  // element of one starting inside an element of the other is shared memory.
  size_t i = 0, j = 0;
  while (i < oa.size() && j < ob.size()) {
    if (oa[i] < ob[j] + ib && ob[j] < oa[i] + ia) {
      return true;
    }
    if (oa[i] < ob[j]) {
      ++i;
    } else {
      ++j;
    }
  }
  return false;
}

// Rejects calls in which a written tensor shares memory with any other tensor
// of the call (grads may share memory with each other: they are only read).
void check_no_shared_memory(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList bufs) {
  c10::SmallVector<MemoryRange, 16> ranges;
  auto add = [&](at::TensorList list, const char* name, bool written) {
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      // Symbolic sizes (tracing) have no byte ranges; the kernels that run
      // on real tensors check them.
      if (!t.has_storage() || symbolic(t) || t.numel() == 0) {
        continue;
      }
      int64_t last = t.storage_offset();
      for (int64_t d = 0; d < t.dim(); ++d) {
        last += (t.size(d) - 1) * t.stride(d);
      }
      const int64_t itemsize = static_cast<int64_t>(t.element_size());
      ranges.push_back(MemoryRange{
          t.storage().unsafeGetStorageImpl(), t.storage_offset() * itemsize,
          (last + 1) * itemsize, &t, name, i, written});
    }
  };
  add(params, "params", true);
  add(grads, "grads", false);
  add(bufs, "momentum_buffers", true);
  if (ranges.size() < 2) {
    return;
  }
  std::sort(ranges.begin(), ranges.end(), [](const MemoryRange& x, const MemoryRange& y) {
    return std::less<const void*>()(x.storage, y.storage) ||
        (x.storage == y.storage && x.begin < y.begin);
  });
  for (size_t i = 0; i < ranges.size(); ++i) {
    const MemoryRange& a = ranges[i];
    for (size_t j = i + 1; j < ranges.size(); ++j) {
      const MemoryRange& b = ranges[j];
      if (b.storage != a.storage || b.begin >= a.end) {
        break;
      }
      if ((a.written || b.written) && share_elements(*a.t, *b.t)) {
        // Name the two in the order of the call's arguments.
        const bool a_first = std::string_view(a.list) == std::string_view(b.list)
            ? a.index < b.index
            : std::string_view(a.list) == "params" ||
                (std::string_view(a.list) == "grads" && std::string_view(b.list) != "params");
        const MemoryRange& x = a_first ? a : b;
        const MemoryRange& y = a_first ? b : a;
        TORCH_CHECK(
            false, op, ": ", y.list, "[", y.index, "] shares memory with ",
            x.list, "[", x.index,
            "] (the same tensor twice, or overlapping views of one storage); "
            "every tensor of one call needs memory of its own");
      }
    }
  }
}

// Rejects in-place writes that torch's own in-place ops would refuse, before
// anything is written: inference tensors outside inference mode, and tensors
// that require grad while grad mode records (the step is not differentiable,
// so autograd would silently miss it).
void check_writable(const char* op, const char* list, size_t i, const at::Tensor& t) {
  TORCH_CHECK(
      !t.is_inference() || c10::InferenceMode::is_enabled(), op, ": ", list,
      "[", i, "] is an inference tensor (made under torch.inference_mode()) "
      "and cannot be updated in place outside inference mode");
  TORCH_CHECK(
      !(t.requires_grad() && at::GradMode::is_enabled()), op, ": ", list, "[",
      i, "] requires grad and grad mode is enabled; the step is not "
      "differentiable: call it under torch.no_grad(), as torch.optim "
      "optimizers do");
}

// A is (C, C) with C = y.size(1); `y_name` is how the op calls its y.
// Sym sizes: the Meta kernels run these checks under dynamic shapes too.
void check_channel_matrix(const char* op, const at::Tensor& A, const at::Tensor& y, const char* y_name) {
  const c10::SymInt& C = y.sym_size(1);
  TORCH_CHECK(
      A.dim() == 2 && A.sym_size(0) == C && A.sym_size(1) == C, op,
      ": A must have shape (C, C) = [", C, ", ", C,
      "] where C = ", y_name, ".size(1), got shape ", A.sym_sizes());
}

} // namespace

void check_sgd_step(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList bufs,
    const SgdOptions& o) {
  constexpr const char* op = "torchiter.sgd_step_";
  check_finite_option(op, "lr", o.lr);
  check_finite_option(op, "momentum", o.momentum);
  check_finite_option(op, "dampening", o.dampening);
  check_finite_option(op, "weight_decay", o.weight_decay);
  TORCH_CHECK(o.lr >= 0, op, ": lr must be >= 0, got ", o.lr);
  TORCH_CHECK(
      o.momentum >= 0, op, ": momentum must be >= 0, got ", o.momentum);
  TORCH_CHECK(
      o.weight_decay >= 0, op, ": weight_decay must be >= 0, got ",
      o.weight_decay);
  TORCH_CHECK(
      !o.nesterov || (o.momentum > 0 && o.dampening == 0), op,
      ": nesterov requires momentum > 0 and dampening == 0, got momentum=",
      o.momentum, " and dampening=", o.dampening);
  check_bounds(op, o.shrink, o.min, o.max);

  TORCH_CHECK(
      grads.size() == params.size(), op, ": grads has ", grads.size(),
      " tensors but params has ", params.size());
  if (o.momentum == 0) {
    TORCH_CHECK(
        bufs.empty(), op,
        ": momentum_buffers must be empty when momentum == 0, got ",
        bufs.size(), " tensors");
  } else {
    TORCH_CHECK(
        bufs.size() == params.size(), op, ": momentum_buffers has ",
        bufs.size(), " tensors but params has ", params.size(),
        " (one buffer per param is needed when momentum != 0)");
  }

  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(
        p.layout() == at::kStrided, op, ": params[", i,
        "] must be a dense (strided) tensor, got layout ", p.layout());
    TORCH_CHECK(
        is_supported_float(p.scalar_type()), op, ": params[", i,
        "] has dtype ", p.scalar_type(),
        " but float32, float64, float16 or bfloat16 is expected");
    TORCH_CHECK(
        p.device() == params[0].device(), op, ": params[", i, "] is on ",
        p.device(), " but params[0] is on ", params[0].device(),
        " (all tensors must live on one device)");
    TORCH_CHECK(
        symbolic(p) || !overlaps_itself(p), op, ": params[", i,
        "] has elements that share memory (an expanded or as_strided view?) "
        "and cannot be updated in place");
    check_writable(op, "params", i, p);
    check_companion("grads", i, grads[i], p);
    if (!bufs.empty()) {
      check_companion("momentum_buffers", i, bufs[i], p);
      TORCH_CHECK(
          symbolic(bufs[i]) || !overlaps_itself(bufs[i]), op,
          ": momentum_buffers[", i, "] has elements that share memory and "
          "cannot be updated in place");
      check_writable(op, "momentum_buffers", i, bufs[i]);
    }
  }
  check_no_shared_memory(op, params, grads, bufs);
}

void check_sgd_lr_tensor(
    at::TensorList params,
    const at::Tensor& lr,
    bool check_value) {
  constexpr const char* op = "torchiter.sgd_step_";
  TORCH_CHECK(lr.defined(), op, ": lr is undefined");
  TORCH_CHECK(
      lr.dim() == 0, op, ": lr must be a 0-dim tensor, got shape ",
      lr.sym_sizes());
  TORCH_CHECK(
      at::isFloatingType(lr.scalar_type()), op,
      ": lr must be a floating tensor, got dtype ", lr.scalar_type());
  if (!params.empty()) {
    TORCH_CHECK(
        lr.device() == params[0].device(), op, ": lr is on ", lr.device(),
        " but params[0] is on ", params[0].device());
  }
  if (check_value) {
    const double v = lr.item<double>();
    TORCH_CHECK(
        std::isfinite(v) && v >= 0, op,
        ": lr must be a finite number >= 0, got ", v);
  }
}

void check_quadratic_descent(
    const at::Tensor& y0,
    const at::Tensor& A,
    const at::Tensor& b,
    const std::optional<at::Tensor>& lrs,
    const QuadraticDescentArgs& a,
    c10::ArrayRef<at::ScalarType> supported) {
  const char* op = a.stats ? "torchiter.quadratic_descent_ex" : "torchiter.quadratic_descent";
  TORCH_CHECK(y0.defined() && A.defined() && b.defined(), op,
      ": y0, A and b must be defined tensors");
  for (const auto* t : {&y0, &A, &b}) {
    TORCH_CHECK(t->layout() == at::kStrided, op,
        ": y0, A and b must be dense (strided) tensors, got layout ",
        t->layout());
  }
  TORCH_CHECK(
      y0.dim() >= 2, op,
      ": y0 must have shape (B, C, *spatial) with at least 2 dims, got shape ",
      y0.sym_sizes());
  TORCH_CHECK(
      at::isFloatingType(y0.scalar_type()), op,
      ": y0 must be a floating tensor, got dtype ", y0.scalar_type());
  bool dtype_ok = false;
  for (auto t : supported) {
    dtype_ok = dtype_ok || t == y0.scalar_type();
  }
  TORCH_CHECK(
      dtype_ok, op, ": dtype ", y0.scalar_type(), " is not supported on ",
      y0.device().type(), "; expected one of ", supported);
  TORCH_CHECK(
      A.scalar_type() == y0.scalar_type() &&
          b.scalar_type() == y0.scalar_type(),
      op, ": y0, A and b must share one dtype, got y0 ", y0.scalar_type(),
      ", A ", A.scalar_type(), ", b ", b.scalar_type());
  TORCH_CHECK(
      A.device() == y0.device() && b.device() == y0.device(), op,
      ": y0, A and b must live on one device, got y0 on ", y0.device(),
      ", A on ", A.device(), ", b on ", b.device());
  check_channel_matrix(op, A, y0, "y0");
  TORCH_CHECK(
      b.sym_sizes() == y0.sym_sizes(), op, ": b has shape ", b.sym_sizes(),
      " but y0 has shape ", y0.sym_sizes());
  check_finite_option(op, "lr", a.lr);
  TORCH_CHECK(a.lr >= 0, op, ": lr must be >= 0, got ", a.lr);
  TORCH_CHECK(
      a.max_iterations >= 0, op, ": max_iterations must be >= 0, got ",
      a.max_iterations);
  TORCH_CHECK(
      !std::isnan(a.tol) && a.tol >= 0, op, ": tol must be >= 0, got ",
      a.tol);
  TORCH_CHECK(
      a.check_every >= 1, op, ": check_every must be >= 1, got ",
      a.check_every);
  check_bounds(op, a.shrink, a.min, a.max);
  TORCH_CHECK(
      !a.trace || a.max_iterations <= kMaxTraceIterations, op,
      ": trace=True records max_iterations entries; at most ",
      kMaxTraceIterations, " are supported, got max_iterations=",
      a.max_iterations);
  if (lrs.has_value() && lrs->defined()) {
    const at::Tensor& l = *lrs;
    TORCH_CHECK(
        at::isFloatingType(l.scalar_type()), op,
        ": lrs must be a floating tensor, got dtype ", l.scalar_type());
    TORCH_CHECK(
        l.dim() == 1, op, ": lrs must be 1-D, got shape ", l.sym_sizes());
    // A device without data (meta) would pick its kernel by lrs alone and
    // hand back uninitialised memory; any other device would read host
    // memory on it.
    TORCH_CHECK(
        l.device().is_cpu() || l.device() == y0.device(), op,
        ": lrs must be on the CPU or on y0's device (", y0.device(),
        "), got lrs on ", l.device());
    TORCH_CHECK(
        l.sym_numel() >= a.max_iterations, op, ": lrs has ", l.sym_numel(),
        " entries but max_iterations is ", a.max_iterations);
  }
}

LearningRates::LearningRates(
    const std::optional<at::Tensor>& lrs,
    const QuadraticDescentArgs& a)
    : op_(a.stats ? "torchiter.quadratic_descent_ex" : "torchiter.quadratic_descent"),
      lr_(a.lr),
      max_iterations_(a.max_iterations) {
  if (lrs.has_value() && lrs->defined() && a.max_iterations > 0) {
    TORCH_INTERNAL_ASSERT(
        lrs->device().is_cpu(),
        "LearningRates got lrs on ", lrs->device(), "; a device lrs is read by the kernels");
    lrs_ = lrs->detach();
  }
}

double LearningRates::at(int64_t k) {
  if (!lrs_.defined()) {
    return lr_;
  }
  if (k < block_start_ || k >= block_start_ + static_cast<int64_t>(block_.size())) {
    load(k);
  }
  return block_[static_cast<size_t>(k - block_start_)];
}

void LearningRates::load(int64_t k) {
  // Blocks double in size: a loop that stops early converts and checks few
  // rates, a long one makes few conversions.
  const int64_t n = std::min(next_block_, max_iterations_ - k);
  TORCH_CHECK(n > 0, op_, ": iteration ", k, " is past max_iterations");
  next_block_ = std::min<int64_t>(next_block_ * 2, int64_t{1} << 16);
  const at::Tensor h = lrs_.narrow(0, k, n).to(at::kCPU, at::kDouble).contiguous();
  const double* p = h.const_data_ptr<double>();
  block_.assign(p, p + n);
  block_start_ = k;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(
        std::isfinite(p[i]) && p[i] >= 0, op_, ": lrs[", k + i,
        "] must be a finite number >= 0, got ", p[i]);
  }
}

bool same_dense_layout(
    const at::Tensor& p,
    const at::Tensor& g,
    const at::Tensor* buf) {
  if (!p.is_non_overlapping_and_dense()) {
    return false;
  }
  if (p.is_contiguous() && g.is_contiguous() && (!buf || buf->is_contiguous())) {
    return true;
  }
  return g.strides() == p.strides() && (!buf || buf->strides() == p.strides());
}

constexpr const char* kQuadraticDescentBackward = "torchiter.quadratic_descent_backward";

void check_quadratic_descent_backward(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& A,
    double shrink, std::optional<double> min, std::optional<double> max) {
  TORCH_CHECK(
      grad_y.defined() && y.defined() && A.defined(), kQuadraticDescentBackward,
      ": grad_y, y and A must be defined tensors");
  TORCH_CHECK(
      y.dim() >= 2, kQuadraticDescentBackward,
      ": y must have shape (B, C, *spatial), got shape ", y.sym_sizes());
  TORCH_CHECK(
      std::find(std::begin(kLoopDtypes), std::end(kLoopDtypes), y.scalar_type()) != std::end(kLoopDtypes),
      kQuadraticDescentBackward, ": y must be float32, float64, float16 or bfloat16, got ",
      y.scalar_type());
  TORCH_CHECK(
      grad_y.scalar_type() == y.scalar_type() &&
          A.scalar_type() == y.scalar_type(),
      kQuadraticDescentBackward, ": grad_y, y and A must share one dtype, got grad_y ",
      grad_y.scalar_type(), ", y ", y.scalar_type(), ", A ", A.scalar_type());
  TORCH_CHECK(
      grad_y.device() == y.device() && A.device() == y.device(), kQuadraticDescentBackward,
      ": grad_y, y and A must live on one device, got grad_y on ",
      grad_y.device(), ", y on ", y.device(), ", A on ", A.device());
  TORCH_CHECK(
      grad_y.sym_sizes() == y.sym_sizes(), kQuadraticDescentBackward, ": grad_y has shape ",
      grad_y.sym_sizes(), " but y has shape ", y.sym_sizes());
  check_channel_matrix(kQuadraticDescentBackward, A, y, "y");
  // The forward's own rule for the projection's options (finite shrink >= 0,
  // no NaN bound, min <= max): the backward differentiates that projection.
  check_bounds(kQuadraticDescentBackward, shrink, min, max);
}

} // namespace torchiter
