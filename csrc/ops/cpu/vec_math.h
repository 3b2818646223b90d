// The per-element projected-SGD update of torchiter.sgd_step_ and the projection
// it shares with quadratic_descent, written once on
// at::vec vectors. Every element, tails included, goes through these vector
// ops (tails by partial loads), so results do not depend on where a thread's
// chunk starts. The fmadd order mirrors torch.optim.SGD's in-place ops.
#pragma once

#include "../ops.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>

namespace torchiter {

// The projection shared by both ops: soft threshold, then clamp to [lo, hi].
template <typename T>
struct VecProjection {
  using Vec = at::vec::Vectorized<T>;
  Vec shrink, neg_shrink, lo, hi;
  bool use_shrink, has_lo, has_hi;

  VecProjection(
      double s,
      const std::optional<double>& min,
      const std::optional<double>& max)
      : shrink(static_cast<T>(s)),
        neg_shrink(static_cast<T>(-s)),
        lo(static_cast<T>(min.value_or(0))),
        hi(static_cast<T>(max.value_or(0))),
        use_shrink(s > 0),
        has_lo(min.has_value()),
        has_hi(max.has_value()) {}

  inline Vec operator()(Vec v) const {
    if (use_shrink) {
      // v - clamp(v, -s, s) == sign(v) * max(|v| - s, 0), bit for bit.
      v = v - at::vec::clamp(v, neg_shrink, shrink);
    }
    if (has_lo) {
      v = at::vec::maximum(v, lo);
    }
    if (has_hi) {
      v = at::vec::minimum(v, hi);
    }
    return v;
  }
};

template <typename T>
struct SgdVecMath {
  using Vec = at::vec::Vectorized<T>;
  Vec neg_lr, momentum, one_minus_damp, wd;
  bool use_wd, use_mom, nesterov, maximize, first_step;
  VecProjection<T> project;

  explicit SgdVecMath(const SgdOptions& o)
      : neg_lr(static_cast<T>(-o.lr)),
        momentum(static_cast<T>(o.momentum)),
        one_minus_damp(static_cast<T>(1 - o.dampening)),
        wd(static_cast<T>(o.weight_decay)),
        use_wd(o.weight_decay != 0),
        use_mom(o.momentum != 0),
        nesterov(o.nesterov),
        maximize(o.maximize),
        first_step(o.first_step),
        project(o.shrink, o.min, o.max) {}

  // Returns the new param; updates `buf` when momentum is on.
  inline Vec operator()(Vec p, Vec g, Vec& buf) const {
    if (maximize) {
      g = g.neg();
    }
    if (use_wd) {
      g = at::vec::fmadd(p, wd, g);
    }
    if (use_mom) {
      buf = first_step ? g : at::vec::fmadd(g, one_minus_damp, buf * momentum);
      g = nesterov ? at::vec::fmadd(buf, momentum, g) : buf;
    }
    return project(at::vec::fmadd(g, neg_lr, p));
  }
};

// Applies the update to n contiguous elements. `buf` is null without momentum.
template <typename scalar_t>
inline void sgd_apply(
    scalar_t* p,
    const scalar_t* g,
    scalar_t* buf,
    int64_t n,
    const SgdVecMath<at::opmath_type<scalar_t>>& math) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  using sVec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = sVec::size();
  for (int64_t i = 0; i < n; i += W) {
    const int64_t cnt = std::min(W, n - i);
    const sVec ps = cnt == W ? sVec::loadu(p + i) : sVec::loadu(p + i, cnt);
    const sVec gs = cnt == W ? sVec::loadu(g + i) : sVec::loadu(g + i, cnt);
    sVec bs(static_cast<scalar_t>(0));
    if (buf) {
      bs = cnt == W ? sVec::loadu(buf + i) : sVec::loadu(buf + i, cnt);
    }
    if constexpr (std::is_same_v<opmath_t, scalar_t>) {
      Vec b = bs;
      const Vec out = math(ps, gs, b);
      out.store(p + i, cnt);
      if (buf) {
        b.store(buf + i, cnt);
      }
    } else {
      auto [p0, p1] = at::vec::convert_to_float<scalar_t>(ps);
      auto [g0, g1] = at::vec::convert_to_float<scalar_t>(gs);
      auto [b0, b1] = at::vec::convert_to_float<scalar_t>(bs);
      const Vec o0 = math(p0, g0, b0);
      const Vec o1 = math(p1, g1, b1);
      at::vec::convert_from_float<scalar_t>(o0, o1).store(p + i, cnt);
      if (buf) {
        at::vec::convert_from_float<scalar_t>(b0, b1).store(buf + i, cnt);
      }
    }
  }
}

} // namespace torchiter
