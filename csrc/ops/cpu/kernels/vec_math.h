// The per-element projected-SGD update of torchiter.sgd_step_ and the projection
// it shares with quadratic_descent, written once on
// at::vec vectors. Every element, tails included, goes through these vector
// ops (tails by partial loads), so results do not depend on where a thread's
// chunk starts. The fmadd order mirrors torch.optim.SGD's in-place ops.
// Everything here lives in the CPU_CAPABILITY namespace of the kernel file
// that includes it (see kernels.h): each variant gets its own copy.
#pragma once

#include "../../ops.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>

namespace torchiter::cpu::CPU_CAPABILITY {

// The projection shared by both ops: soft threshold, then clamp to [lo, hi].
// Absent bounds are infinities: clamp_min/clamp_max are one max/min each
// (NaN in v passes through), cheaper than a branch on every vector.
template <typename T>
struct VecProjection {
  using Vec = at::vec::Vectorized<T>;
  Vec shrink, neg_shrink, lo, hi;
  bool use_shrink;

  VecProjection(
      double s,
      const std::optional<double>& min,
      const std::optional<double>& max)
      : shrink(static_cast<T>(s)),
        neg_shrink(static_cast<T>(-s)),
        lo(min ? static_cast<T>(*min) : -std::numeric_limits<T>::infinity()),
        hi(max ? static_cast<T>(*max) : std::numeric_limits<T>::infinity()),
        use_shrink(s > 0) {}

  template <bool SHRINK>
  inline Vec apply(Vec v) const {
    if constexpr (SHRINK) {
      // v - clamp(v, -s, s) == sign(v) * max(|v| - s, 0), bit for bit.
      v = v - at::vec::clamp(v, neg_shrink, shrink);
    }
    return at::vec::clamp_max(at::vec::clamp_min(v, lo), hi);
  }

  inline Vec operator()(Vec v) const {
    return use_shrink ? apply<true>(v) : apply<false>(v);
  }
};

// Momentum handling of one step, a template parameter of the kernels.
enum class Mom { kNone, kFirst, kBlend };

template <typename T>
struct SgdVecMath {
  using Vec = at::vec::Vectorized<T>;
  Vec neg_lr, momentum, one_minus_damp, wd, sign;
  VecProjection<T> project;

  explicit SgdVecMath(const SgdOptions& o)
      : neg_lr(static_cast<T>(-o.lr)),
        momentum(static_cast<T>(o.momentum)),
        one_minus_damp(static_cast<T>(1 - o.dampening)),
        wd(static_cast<T>(o.weight_decay)),
        sign(static_cast<T>(o.maximize ? -1 : 1)),
        project(o.shrink, o.min, o.max) {}

  // Returns the new param; updates `buf` unless MOM is kNone. The fmadd order
  // mirrors torch.optim.SGD's in-place ops; g * (+-1) is exact.
  template <Mom MOM, bool NESTEROV, bool WD, bool SHRINK>
  inline Vec step(Vec p, Vec g, Vec& buf) const {
    g = g * sign;
    if constexpr (WD) {
      g = at::vec::fmadd(p, wd, g);
    }
    if constexpr (MOM == Mom::kFirst) {
      buf = g;
    } else if constexpr (MOM == Mom::kBlend) {
      buf = at::vec::fmadd(g, one_minus_damp, buf * momentum);
    }
    if constexpr (MOM != Mom::kNone) {
      g = NESTEROV ? at::vec::fmadd(buf, momentum, g) : buf;
    }
    return project.template apply<SHRINK>(at::vec::fmadd(g, neg_lr, p));
  }
};

// Calls f.template operator()<MOM, NESTEROV, WD, SHRINK>() with the flags of
// `o` as compile-time constants, so the element loop has no branches.
template <typename F>
inline void dispatch_sgd_flags(const SgdOptions& o, F&& f) {
  auto with_shrink = [&](auto mom, auto nest, auto wd) {
    if (o.shrink > 0) {
      f.template operator()<decltype(mom)::value, decltype(nest)::value, decltype(wd)::value, true>();
    } else {
      f.template operator()<decltype(mom)::value, decltype(nest)::value, decltype(wd)::value, false>();
    }
  };
  auto with_wd = [&](auto mom, auto nest) {
    if (o.weight_decay != 0) {
      with_shrink(mom, nest, std::true_type{});
    } else {
      with_shrink(mom, nest, std::false_type{});
    }
  };
  using First = std::integral_constant<Mom, Mom::kFirst>;
  using Blend = std::integral_constant<Mom, Mom::kBlend>;
  if (o.momentum == 0) {
    with_wd(std::integral_constant<Mom, Mom::kNone>{}, std::false_type{});
  } else if (o.nesterov) {
    o.first_step ? with_wd(First{}, std::true_type{}) : with_wd(Blend{}, std::true_type{});
  } else {
    o.first_step ? with_wd(First{}, std::false_type{}) : with_wd(Blend{}, std::false_type{});
  }
}

// Loads n <= W elements (a partial load past the end of the data).
template <typename V, typename scalar_t>
inline V load_n(const scalar_t* p, int64_t n) {
  return n == V::size() ? V::loadu(p) : V::loadu(p, n);
}

// Applies the update to n contiguous elements. `buf` is null when MOM is kNone.
template <typename scalar_t, Mom MOM, bool NESTEROV, bool WD, bool SHRINK>
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
  constexpr bool kBuf = MOM != Mom::kNone;
  auto body = [&](int64_t i, int64_t cnt) {
    const sVec ps = load_n<sVec>(p + i, cnt);
    const sVec gs = load_n<sVec>(g + i, cnt);
    sVec bs(static_cast<scalar_t>(0));
    if constexpr (MOM == Mom::kBlend) {
      bs = load_n<sVec>(buf + i, cnt);
    }
    if constexpr (std::is_same_v<opmath_t, scalar_t>) {
      Vec b = bs;
      math.template step<MOM, NESTEROV, WD, SHRINK>(ps, gs, b).store(p + i, cnt);
      if constexpr (kBuf) {
        b.store(buf + i, cnt);
      }
    } else {
      auto [p0, p1] = at::vec::convert_to_float<scalar_t>(ps);
      auto [g0, g1] = at::vec::convert_to_float<scalar_t>(gs);
      auto [b0, b1] = at::vec::convert_to_float<scalar_t>(bs);
      const Vec o0 = math.template step<MOM, NESTEROV, WD, SHRINK>(p0, g0, b0);
      const Vec o1 = math.template step<MOM, NESTEROV, WD, SHRINK>(p1, g1, b1);
      at::vec::convert_from_float<scalar_t>(o0, o1).store(p + i, cnt);
      if constexpr (kBuf) {
        at::vec::convert_from_float<scalar_t>(b0, b1).store(buf + i, cnt);
      }
    }
  };
  int64_t i = 0;
  // Two vectors per trip, as ATen's own elementwise loops do: this pass is
  // bound by memory, and a second independent load pair in flight per trip
  // keeps more cache-line requests outstanding.
  for (; i + 2 * W <= n; i += 2 * W) {
    body(i, W);
    body(i + W, W);
  }
  for (; i + W <= n; i += W) {
    body(i, W);
  }
  if (i < n) {
    body(i, n - i);
  }
}

} // namespace torchiter::cpu::CPU_CAPABILITY
