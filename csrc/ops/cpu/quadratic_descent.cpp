// CPU kernel of torchiter.quadratic_descent: the whole projected-gradient loop
// y <- project(y - lr_k (A y - b)) in one call.
//
// Positions (sample, spatial index) are independent: A only mixes channels. The
// kernel works on a padded (G, C, P) copy in which positions run along the
// contiguous dim, so one vector lane is one position and the C x C mixing is a
// chain of broadcast-FMAs. Positions are cut into fixed tiles (their width
// depends only on C and the dtype), so every position sees the same arithmetic
// at any thread count: the result is bitwise-stable.
//
// Without a stop test (tol == 0) each tile runs all iterations while it sits in
// L1 ("blocked" mode, one read and one write of y in total). With tol > 0 each
// iteration is one parallel sweep over y that also yields max |y_k - y_{k-1}|.
// From kGemmMinChannels channels on, each iteration is a BLAS GEMM (A times
// the (C, positions) panel, into a preallocated buffer) followed by one fused
// pass for the step, projection and delta.
#include "../ops.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace torchiter {
namespace {

using at::vec::Vectorized;

// A panel: C rows of positions with row stride `ld` (a multiple of the width).
template <typename T>
struct Panel {
  const T* A;
  int64_t C;
  const VecProjection<T>* project;
};

// |new - old|, with lanes at or past `lanes` (padding) zeroed: they must not
// count in the convergence test.
template <typename T>
inline Vectorized<T> masked_delta(const Vectorized<T>& nv, const Vectorized<T>& old, int64_t lanes) {
  using Vec = Vectorized<T>;
  const Vec d = (nv - old).abs();
  if (lanes >= Vec::size()) {
    return d;
  }
  return lanes > 0 ? Vec::set(Vec(static_cast<T>(0)), d, lanes) : Vec(static_cast<T>(0));
}

// Updates rows [i, i + R) of the NV * W positions at column s. With DELTA,
// returns max |new - old| over the first `valid` of those positions (NaN if
// any is NaN). R x NV accumulators share each broadcast of A and each load of
// y (a register-blocked GEMM). Deltas are returned by value, not folded
// through a pointer: the stores to yn could alias it, which would serialise
// the maxima through memory.
template <typename T, int R, int NV, bool DELTA>
inline Vectorized<T> rows_step(
    const Panel<T>& pn, int64_t i, const T* y, const T* b, T* yn,
    int64_t ld, int64_t s, const Vectorized<T>& neg_lr, int64_t valid) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t C = pn.C;
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = Vec(static_cast<T>(0));
    }
  }
  const T* Ai = pn.A + i * C;
  for (int64_t j = 0; j < C; ++j) {
    Vec yj[NV];
    for (int v = 0; v < NV; ++v) {
      yj[v] = Vec::loadu(y + j * ld + s + v * W);
    }
    for (int r = 0; r < R; ++r) {
      const Vec a(Ai[r * C + j]);
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = at::vec::fmadd(a, yj[v], acc[r][v]);
      }
    }
  }
  Vec dmax(static_cast<T>(0));
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      const int64_t off = (i + r) * ld + s + v * W;
      const Vec old = Vec::loadu(y + off);
      const Vec grad = acc[r][v] - Vec::loadu(b + off);
      const Vec nv = (*pn.project)(at::vec::fmadd(grad, neg_lr, old));
      nv.store(yn + off);
      if constexpr (DELTA) {
        dmax = at::vec::maximum(dmax, masked_delta(nv, old, valid - v * W));
      }
    }
  }
  return dmax;
}

template <typename T, int NV, bool DELTA>
inline Vectorized<T> column_step(
    const Panel<T>& pn, const T* y, const T* b, T* yn, int64_t ld, int64_t s,
    const Vectorized<T>& neg_lr, int64_t valid) {
  Vectorized<T> dmax(static_cast<T>(0));
  int64_t i = 0;
  for (; i + 4 <= pn.C; i += 4) {
    dmax = at::vec::maximum(dmax, rows_step<T, 4, NV, DELTA>(pn, i, y, b, yn, ld, s, neg_lr, valid));
  }
  Vectorized<T> tail(static_cast<T>(0));
  switch (pn.C - i) {
    case 3: tail = rows_step<T, 3, NV, DELTA>(pn, i, y, b, yn, ld, s, neg_lr, valid); break;
    case 2: tail = rows_step<T, 2, NV, DELTA>(pn, i, y, b, yn, ld, s, neg_lr, valid); break;
    case 1: tail = rows_step<T, 1, NV, DELTA>(pn, i, y, b, yn, ld, s, neg_lr, valid); break;
    default: break;
  }
  return DELTA ? at::vec::maximum(dmax, tail) : dmax;
}

// One iteration over columns [0, n) of a panel (n a multiple of the width;
// lanes at or past `valid` are padding, excluded from the delta). Every lane
// sees the same sequence of operations whichever block it falls in, so the
// blocking does not change results. Returns the lane-wise max |delta| (zeros
// without DELTA).
template <typename T, bool DELTA>
inline Vectorized<T> panel_step(
    const Panel<T>& pn, const T* y, const T* b, T* yn, int64_t ld, int64_t n,
    int64_t valid, T lr) {
  constexpr int64_t W = Vectorized<T>::size();
  const Vectorized<T> neg_lr(-lr);
  Vectorized<T> dmax(static_cast<T>(0));
  int64_t s = 0;
  for (; s + 2 * W <= n; s += 2 * W) {
    const auto d = column_step<T, 2, DELTA>(pn, y, b, yn, ld, s, neg_lr, valid - s);
    if constexpr (DELTA) {
      dmax = at::vec::maximum(dmax, d);
    }
  }
  for (; s < n; s += W) {
    const auto d = column_step<T, 1, DELTA>(pn, y, b, yn, ld, s, neg_lr, valid - s);
    if constexpr (DELTA) {
      dmax = at::vec::maximum(dmax, d);
    }
  }
  return dmax;
}

// The GEMM path's second half: given G = A·y for columns [0, n) of a panel,
// ynext = project(y - lr (G - b)), one pass over memory. With `delta`,
// returns the lane-wise max |delta| (by value, as panel_step does).
template <typename T>
inline Vectorized<T> panel_update(
    const VecProjection<T>& project, int64_t C, const T* G, const T* y,
    const T* b, T* yn, int64_t ld, int64_t n, int64_t valid, T lr,
    bool delta) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec neg_lr(-lr);
  Vec dmax(static_cast<T>(0));
  for (int64_t i = 0; i < C; ++i) {
    for (int64_t s = 0; s < n; s += W) {
      const int64_t off = i * ld + s;
      const Vec old = Vec::loadu(y + off);
      const Vec grad = Vec::loadu(G + off) - Vec::loadu(b + off);
      const Vec nv = project(at::vec::fmadd(grad, neg_lr, old));
      nv.store(yn + off);
      if (delta) {
        dmax = at::vec::maximum(dmax, masked_delta(nv, old, valid - s));
      }
    }
  }
  return dmax;
}

// From this many channels on, the mixing is a BLAS GEMM per iteration: the
// register-blocked kernel's working set no longer fits the caches.
constexpr int64_t kGemmMinChannels = 128;

// Max over the lanes of v, NaN-propagating (a NaN must never pass a stop test).
template <typename T>
T lane_max(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T m = 0;
  for (auto x : buf) {
    if (std::isnan(x)) {
      return x;
    }
    m = std::max(m, x);
  }
  return m;
}

// Tile width: a multiple of the vector width such that the three C x tile
// blocks a tile touches (y, its next value, b) stay within about 40 KiB of L1.
template <typename T>
int64_t tile_width(int64_t C) {
  constexpr int64_t W = Vectorized<T>::size();
  const int64_t fit =
      (40 * 1024) / (3 * std::max<int64_t>(C, 1) * static_cast<int64_t>(sizeof(T)));
  return std::clamp<int64_t>((fit / W) * W, W, 256);
}

struct Layout {
  int64_t G;      // groups (batch in native layout, 1 when permuted)
  int64_t P;      // positions per group
  int64_t Ppad;   // P rounded up to the vector width
  bool permuted;  // positions are (batch, spatial) pairs
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> run(
    const at::Tensor& y0, const at::Tensor& A_in, const at::Tensor& b_in,
    const QuadraticDescentArgs& args, LearningRates& lrs) {
  constexpr int64_t W = Vectorized<T>::size();
  const auto [B, C, S] = bcs_sizes(y0);
  // Few spatial positions: gather all (batch, spatial) positions into one
  // panel so that vector lanes are filled.
  const bool gemm = C >= kGemmMinChannels;
  Layout L;
  // The GEMM path multiplies A by one (C, positions) matrix.
  L.permuted = gemm || S < 4 * W;
  L.G = L.permuted ? 1 : B;
  L.P = L.permuted ? B * S : S;
  L.Ppad = (L.P + W - 1) / W * W;

  // Copies into and out of the panels are plain loops: for the small
  // problems this op is for, ATen's reshape/permute/copy chain would cost
  // more than the whole loop.
  auto to_panels = [&](const at::Tensor& t) {
    const at::Tensor src_t = t.contiguous();
    const T* src = src_t.const_data_ptr<T>();
    at::Tensor out = at::empty({L.G, C, L.Ppad}, t.options().memory_format(at::MemoryFormat::Contiguous));
    T* dst = out.data_ptr<T>();
    for (int64_t g = 0; g < L.G; ++g) {
      for (int64_t c = 0; c < C; ++c) {
        T* row = dst + (g * C + c) * L.Ppad;
        if (L.permuted) {
          // Element loops, not copy_n: S is often 1 (a transpose).
          for (int64_t bb = 0; bb < B; ++bb) {
            for (int64_t s = 0; s < S; ++s) {
              row[bb * S + s] = src[(bb * C + c) * S + s];
            }
          }
        } else {
          std::copy_n(src + (g * C + c) * S, S, row);
        }
        std::fill(row + L.P, row + L.Ppad, T(0));
      }
    }
    return out;
  };
  at::Tensor Y = to_panels(y0);
  const at::Tensor Bm = to_panels(b_in);
  const at::Tensor A = A_in.contiguous();
  const VecProjection<T> proj(args.shrink, args.min, args.max);
  const Panel<T> pn{A.const_data_ptr<T>(), C, &proj};

  const int64_t T_w = gemm ? 64 * W : tile_width<T>(C);
  const int64_t tiles_per_group = (L.Ppad + T_w - 1) / T_w;
  const int64_t ntiles = L.G * tiles_per_group;
  const int64_t group_stride = C * L.Ppad;
  // Enough tiles per task that a thread gets ~64k FMAs: small problems stay
  // on the calling thread, with no parallel-region overhead per iteration.
  const int64_t work_per_tile = gemm ? C * T_w : C * C * T_w;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_tile));

  auto tile_bounds = [&](int64_t t, int64_t& off, int64_t& n, int64_t& valid) {
    const int64_t g = t / tiles_per_group;
    const int64_t s0 = (t % tiles_per_group) * T_w;
    off = g * group_stride + s0;
    n = std::min(T_w, L.Ppad - s0);
    valid = std::max<int64_t>(0, std::min(T_w, L.P - s0));
  };

  const int64_t K = args.max_iterations;
  int64_t iterations = K;
  const bool stop_test = args.tol > 0;
  const T* b = Bm.const_data_ptr<T>();

  if (!stop_test && !gemm) {
    // Blocked: each tile is copied into three tile-local C x T_w blocks
    // (allocated once per task, never per iteration) and runs all K
    // iterations there before its result is written back. Without a stop
    // test all K iterations run, so a schedule's rates are read up front
    // (every tile needs them).
    const T lr = static_cast<T>(args.lr);
    std::vector<T> tile_lrs(lrs.scheduled() ? static_cast<size_t>(K) : 0);
    for (size_t k = 0; k < tile_lrs.size(); ++k) {
      tile_lrs[k] = static_cast<T>(lrs.at(static_cast<int64_t>(k)));
    }
    T* y = Y.data_ptr<T>();
    at::parallel_for(0, ntiles, std::max<int64_t>(1, grain / std::max<int64_t>(K, 1)), [&](int64_t t0, int64_t t1) {
      std::vector<T> local(static_cast<size_t>(3 * C * T_w));
      T* cur = local.data();
      T* nxt = cur + C * T_w;
      T* bl = nxt + C * T_w;
      for (int64_t t = t0; t < t1; ++t) {
        int64_t off, n, valid;
        tile_bounds(t, off, n, valid);
        for (int64_t c = 0; c < C; ++c) {
          std::copy_n(y + off + c * L.Ppad, n, cur + c * T_w);
          std::copy_n(b + off + c * L.Ppad, n, bl + c * T_w);
        }
        T* src = cur;
        T* dst = nxt;
        for (int64_t k = 0; k < K; ++k) {
          panel_step<T, false>(pn, src, bl, dst, T_w, n, valid,
                               tile_lrs.empty() ? lr : tile_lrs[static_cast<size_t>(k)]);
          std::swap(src, dst);
        }
        for (int64_t c = 0; c < C; ++c) {
          std::copy_n(src + c * T_w, n, y + off + c * L.Ppad);
        }
      }
    });
  } else {
    // Sweeps: one pass per iteration from Y into Y2 and back (after a GEMM
    // into G on the GEMM path); each tile records its max |y_k - y_{k-1}|
    // when iteration k is a check.
    at::Tensor Y2 = at::empty_like(Y);
    at::Tensor G = gemm ? at::empty({C, L.Ppad}, Y.options()) : at::Tensor();
    std::vector<T> tile_max(static_cast<size_t>(ntiles));
    at::Tensor src_t = Y;
    at::Tensor dst_t = Y2;
    for (int64_t k = 0; k < K; ++k) {
      const bool check = stop_test && k >= 1 && k % args.check_every == 0;
      const T lr = static_cast<T>(lrs.at(k));
      const T* src = src_t.const_data_ptr<T>();
      T* dst = dst_t.data_ptr<T>();
      if (gemm) {
        at::mm_out(G, A, src_t.view({C, L.Ppad}));
      }
      const T* g = gemm ? G.const_data_ptr<T>() : nullptr;
      at::parallel_for(0, ntiles, grain, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          int64_t off, n, valid;
          tile_bounds(t, off, n, valid);
          Vectorized<T> dmax(static_cast<T>(0));
          if (gemm) {
            dmax = panel_update<T>(proj, C, g + off, src + off, b + off, dst + off, L.Ppad, n, valid, lr, check);
          } else if (check) {
            dmax = panel_step<T, true>(pn, src + off, b + off, dst + off, L.Ppad, n, valid, lr);
          } else {
            panel_step<T, false>(pn, src + off, b + off, dst + off, L.Ppad, n, valid, lr);
          }
          tile_max[static_cast<size_t>(t)] = lane_max(dmax);
        }
      });
      std::swap(src_t, dst_t);
      if (check) {
        T m = 0;
        for (T x : tile_max) {
          m = std::isnan(x) || std::isnan(m) ? std::numeric_limits<T>::quiet_NaN()
                                              : std::max(m, x);
        }
        // NaN < tol is false: a diverged loop never counts as converged.
        if (m < static_cast<T>(args.tol)) {
          iterations = k + 1;
          break;
        }
      }
    }
    Y = src_t;
  }

  // Back from padded panels to the caller's (B, C, *spatial) shape.
  at::Tensor out = at::empty(y0.sizes(), y0.options().memory_format(at::MemoryFormat::Contiguous));
  {
    const T* src = Y.const_data_ptr<T>();
    T* dst = out.data_ptr<T>();
    for (int64_t g = 0; g < L.G; ++g) {
      for (int64_t c = 0; c < C; ++c) {
        const T* row = src + (g * C + c) * L.Ppad;
        if (L.permuted) {
          for (int64_t bb = 0; bb < B; ++bb) {
            for (int64_t s = 0; s < S; ++s) {
              dst[(bb * C + c) * S + s] = row[bb * S + s];
            }
          }
        } else {
          std::copy_n(row, S, dst + (g * C + c) * S);
        }
      }
    }
  }
  return {out, at::scalar_tensor(iterations, y0.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor> quadratic_descent_cpu(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    double lr, int64_t max_iterations, double tol, int64_t check_every,
    const std::optional<at::Tensor>& lrs, double shrink,
    std::optional<double> min, std::optional<double> max) {
  const QuadraticDescentArgs args{lr, max_iterations, tol, check_every,
                                  shrink, min, max};
  check_quadratic_descent(y0, A, b, lrs, args, {at::kFloat, at::kDouble});
  TORCH_CHECK(
      y0.device().is_cpu(), "torchiter.quadratic_descent: the CPU kernel got y0 on ",
      y0.device());
  LearningRates host_lrs(lrs, args);
  at::Tensor y0d = y0.detach();
  if (y0.numel() == 0) {
    return {y0d.clone(at::MemoryFormat::Contiguous),
            at::scalar_tensor(max_iterations, y0.options().dtype(at::kLong))};
  }
  return AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "torchiter.quadratic_descent", [&] {
    return run<scalar_t>(y0d, A.detach(), b.detach(), args, host_lrs);
  });
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, CPU, m) {
  m.impl("quadratic_descent", &quadratic_descent_cpu);
}

} // namespace torchiter
