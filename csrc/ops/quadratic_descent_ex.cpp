// torchiter.quadratic_descent_ex on any device: the statistics of the loop
// (make_ex_result) and the device-generic driver, which runs the device's
// plain quadratic_descent between the iterations it has to measure.
//
// A measured iteration k is one where a statistic or the stop test needs
// max |y_k - y_{k-1}|: the first (k = 0), the last (max_iterations - 1),
// every stop test (k >= 1, k % check_every == 0, tol > 0) and, with trace,
// every iteration. The driver runs the plain loop up to k, keeps y_{k-1},
// runs iteration k alone and reduces the change with ATen. Only the stop
// test reads a value on the host: counts and flags are written on y's device,
// and the rows a per-sample test picks travel there through pinned memory
// (a copy from pageable memory would wait for the device). Each plain call
// starts at the same per-element arithmetic, so the chunks change no result.
#include "ops.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace torchiter {

QuadraticDescentResult make_ex_result(
    at::Tensor y, const at::Tensor& iterations, const at::Tensor& converged,
    const at::Tensor& first_change, const at::Tensor& last_change,
    at::Tensor change_trace, bool per_sample) {
  // 0/0 (no change at all) is 0; x/0 is inf and NaN stays NaN.
  at::Tensor growth = at::where(
      first_change.eq(0).logical_and(last_change.eq(0)),
      at::zeros_like(last_change), last_change / first_change);
  QuadraticDescentResult r{std::move(y), iterations, converged, last_change, growth,
                           std::move(change_trace)};
  if (!per_sample) {
    for (at::Tensor* t : {&r.iterations, &r.converged, &r.change, &r.growth}) {
      *t = t->reshape({});
    }
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor> with_float32_loop(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::function<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&)>& run) {
  auto [y, iterations] = run(y0.to(at::kFloat), A.to(at::kFloat), b.to(at::kFloat));
  return {y.to(y0.scalar_type()), iterations};
}

QuadraticDescentResult with_float32_loop_ex(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::function<QuadraticDescentResult(
        const at::Tensor&, const at::Tensor&, const at::Tensor&)>& run) {
  QuadraticDescentResult r = run(y0.to(at::kFloat), A.to(at::kFloat), b.to(at::kFloat));
  for (at::Tensor* t : {&r.y, &r.change, &r.growth, &r.change_trace}) {
    *t = t->to(y0.scalar_type());
  }
  return r;
}

QuadraticDescentResult make_ex_result_host(
    at::Tensor y, const std::vector<int64_t>& iterations,
    const std::vector<uint8_t>& converged, const std::vector<double>& first_change,
    const std::vector<double>& last_change, const std::vector<double>& change_trace,
    bool per_sample) {
  // The CPU kernel's statistics written straight into their tensors: for the
  // small loops this op serves, the dozen ATen ops of make_ex_result (and the
  // conversions from host vectors) cost as much as the loop. Same values:
  // changes rounded to y's dtype, growth divided in that dtype.
  TORCH_INTERNAL_ASSERT(y.device().is_cpu(), "make_ex_result_host: y must be on the CPU");
  const auto n = static_cast<int64_t>(iterations.size());
  const std::vector<int64_t> shape = per_sample ? std::vector<int64_t>{n} : std::vector<int64_t>{};
  TORCH_INTERNAL_ASSERT(per_sample || n == 1);
  const auto opts = y.options();
  at::Tensor it = at::empty(shape, opts.dtype(at::kLong));
  at::Tensor cv = at::empty(shape, opts.dtype(at::kBool));
  at::Tensor change = at::empty(shape, opts);
  at::Tensor growth = at::empty(shape, opts);
  at::Tensor trace = at::empty({static_cast<int64_t>(change_trace.size())}, opts);
  std::copy(iterations.begin(), iterations.end(), it.data_ptr<int64_t>());
  bool* cv_out = cv.data_ptr<bool>();
  for (int64_t i = 0; i < n; ++i) {
    cv_out[i] = converged[static_cast<size_t>(i)] != 0;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "make_ex_result_host", [&] {
    scalar_t* ch = change.data_ptr<scalar_t>();
    scalar_t* gr = growth.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const auto first = static_cast<scalar_t>(first_change[static_cast<size_t>(i)]);
      const auto last = static_cast<scalar_t>(last_change[static_cast<size_t>(i)]);
      ch[i] = last;
      // 0/0 (no change at all) is 0; x/0 is inf and NaN stays NaN.
      gr[i] = first == scalar_t(0) && last == scalar_t(0) ? scalar_t(0) : static_cast<scalar_t>(last / first);
    }
    std::transform(change_trace.begin(), change_trace.end(), trace.data_ptr<scalar_t>(),
                   [](double v) { return static_cast<scalar_t>(v); });
  });
  return {std::move(y), it, cv, change, growth, trace};
}

at::Tensor prefix_view(const at::Tensor& base, at::IntArrayRef sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) {
    n *= s;
  }
  return base.view(-1).narrow(0, 0, n).view(sizes);
}

at::Tensor column_block_view(const at::Tensor& base, int64_t rows, int64_t cols, int64_t ld) {
  return base.view(-1).narrow(0, 0, rows * ld).view({rows, ld}).narrow(1, 0, cols);
}

namespace {

// max |a - b| over every dim but the first: shape (a.size(0),), NaN if any
// element is NaN (amax propagates it).
at::Tensor sample_change(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().flatten(1).amax(1);
}

// Indices made on the host, on `device` without a synchronisation. The
// pinned buffer may be freed at once: the caching host allocator keeps it
// until the copy it was recorded with has run.
at::Tensor indices_on(const std::vector<int64_t>& v, const at::Device& device) {
  at::Tensor h = at::empty(
      {static_cast<int64_t>(v.size())},
      at::TensorOptions().dtype(at::kLong).pinned_memory(device.is_cuda()));
  std::copy(v.begin(), v.end(), h.data_ptr<int64_t>());
  return device.is_cpu() ? h : h.to(h.options().device(device), /*non_blocking=*/true);
}

} // namespace

QuadraticDescentResult quadratic_descent_ex_generic(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b_in,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args,
    PlainQuadraticDescent plain) {
  const int64_t B = y0.size(0);
  const int64_t K = args.max_iterations;
  const bool per_sample = args.per_sample;
  const int64_t n_stats = per_sample ? B : 1;
  const auto opts = y0.options();
  const auto long_opts = opts.dtype(at::kLong);
  const bool scheduled = lrs.has_value() && lrs->defined();

  at::Tensor out = y0.detach().clone(at::MemoryFormat::Contiguous);
  at::Tensor first = at::zeros({n_stats}, opts);
  at::Tensor last = at::zeros({n_stats}, opts);
  at::Tensor trace = at::full(
      {args.trace ? K : 0}, std::numeric_limits<double>::quiet_NaN(), opts);
  at::Tensor iterations = at::zeros({n_stats}, long_opts);
  at::Tensor converged = at::zeros({n_stats}, opts.dtype(at::kBool));
  if (y0.numel() == 0 || K == 0) {
    // An empty y runs every iteration with no change to test.
    iterations.fill_(K);
    trace.zero_();
    return make_ex_result(out, iterations, converged, first, last, trace, per_sample);
  }

  // The plain loop over iterations [k, k + n), without a stop test.
  const auto run_plain = [&](const at::Tensor& y, const at::Tensor& b, int64_t k, int64_t n) {
    QuadraticDescentArgs a = args;
    a.max_iterations = n;
    a.tol = 0;
    a.check_every = 1;
    a.per_sample = false;
    a.trace = false;
    a.stats = false;
    std::optional<at::Tensor> l;
    if (scheduled) {
      l = lrs->narrow(0, k, n);
    }
    return std::get<0>(plain(y, A, b, l, a));
  };
  const auto is_check = [&](int64_t k) {
    return args.tol > 0 && k >= 1 && k % args.check_every == 0;
  };
  // The first measured iteration at or after k.
  const auto next_measured = [&](int64_t k) {
    if (k == 0 || args.trace) {
      return k;
    }
    int64_t e = K - 1;
    if (args.tol > 0) {
      const int64_t c = (k + args.check_every - 1) / args.check_every * args.check_every;
      e = std::min(e, c);
    }
    return e;
  };

  at::Tensor y = out;
  at::Tensor b = b_in.contiguous();
  // Original index of each sample still in the batch (per_sample), and
  // their number.
  at::Tensor present_idx = at::arange(B, long_opts);
  int64_t n_present = B;
  int64_t k = 0;
  bool stopped = false;
  while (k < K && !stopped) {
    const int64_t e = next_measured(k);
    if (e > k) {
      y = run_plain(y, b, k, e - k);
    }
    const at::Tensor before = y;
    y = run_plain(y, b, e, 1);
    at::Tensor d = sample_change(y, before);
    if (!per_sample) {
      d = d.amax().reshape({1});
    }
    if (e == 0) {
      per_sample ? first.index_copy_(0, present_idx, d) : first.copy_(d);
    }
    per_sample ? last.index_copy_(0, present_idx, d) : last.copy_(d);
    if (args.trace) {
      trace.select(0, e).copy_(d.amax());
    }
    k = e + 1;
    if (!is_check(e)) {
      continue;
    }
    // The loop's one host synchronisation, once per stop test.
    const at::Tensor stop = d.lt(args.tol).to(at::kCPU);
    const bool* s = stop.const_data_ptr<bool>();
    if (!per_sample) {
      if (s[0]) {
        converged.fill_(true);
        stopped = true;
      }
      continue;
    }
    // The rows that stopped, then those that keep running.
    std::vector<int64_t> rows;
    rows.reserve(static_cast<size_t>(n_present));
    for (int64_t i = 0; i < n_present; ++i) {
      if (s[i]) {
        rows.push_back(i);
      }
    }
    const auto n_done = static_cast<int64_t>(rows.size());
    if (n_done == 0) {
      continue;
    }
    for (int64_t i = 0; i < n_present; ++i) {
      if (!s[i]) {
        rows.push_back(i);
      }
    }
    const at::Tensor all_rows = indices_on(rows, y.device());
    const at::Tensor done_rows = all_rows.narrow(0, 0, n_done);
    const at::Tensor done_orig = present_idx.index_select(0, done_rows);
    converged.index_fill_(0, done_orig, true);
    iterations.index_fill_(0, done_orig, k);
    out.index_copy_(0, done_orig, y.index_select(0, done_rows));
    if (n_done == n_present) {
      stopped = true;
      n_present = 0;
      break;
    }
    // The frozen samples leave the batch: they cost nothing from here on.
    const at::Tensor keep_rows = all_rows.narrow(0, n_done, n_present - n_done);
    y = y.index_select(0, keep_rows);
    b = b.index_select(0, keep_rows);
    present_idx = present_idx.index_select(0, keep_rows);
    n_present -= n_done;
  }
  if (per_sample) {
    if (n_present > 0) {
      iterations.index_fill_(0, present_idx, k);
      out.index_copy_(0, present_idx, y);
    }
  } else {
    iterations.fill_(k);
    out = y.is_contiguous() ? y : y.contiguous();
  }
  return make_ex_result(out, iterations, converged, first, last, trace, per_sample);
}

} // namespace torchiter
