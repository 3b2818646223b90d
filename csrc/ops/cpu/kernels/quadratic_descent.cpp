// CPU kernel of torchiter.quadratic_descent (one instruction-set variant, see
// kernels.h): the whole projected-gradient loop y <- project(y - lr_k (A y - b))
// in one call.
//
// Positions (sample, spatial index) are independent: A only mixes channels. The
// kernel works on a padded (groups, C, positions) working copy in which
// positions run along the contiguous dim, so one vector lane is one position
// and the C x C mixing is a chain of broadcast-FMAs. Positions are cut into
// fixed tiles (their width depends only on C and the dtype), so every position
// sees the same arithmetic at any thread count: the result is bitwise-stable.
//
// The driver's steps mirror the CUDA file: to_working() packs y0 and b,
// run_blocked() (tol == 0: each tile runs all iterations while it sits in L1,
// one read and one write of y in total) or run_sweeps() (tol > 0: one
// parallel sweep over y per iteration that also yields max |y_k - y_{k-1}|;
// from kGemmMinChannels channels on, each sweep follows a BLAS GEMM of A with
// the (C, positions) matrix), then from_working() unpacks the result. When
// positions are per sample, run_blocked() reads its tiles from y0 and b and
// writes the result directly, with no working copy. run_per_sample() is
// quadratic_descent_ex's per-sample loop.
#include "kernels.h"
#include "vec_math.h"
#include "../../interrupt.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <utility>
#include <type_traits>
#include <vector>

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Tallest register block of rows (see "Register blocking" below rows_step).
constexpr int kMaxRows = 5;

// What one iteration applies to a block of positions: the (C, C) channel
// mixing matrix A (row-major) and the projection. The blocks it works on are
// C rows of positions with a row stride `ld` (a multiple of the width).
template <typename T>
struct ChannelMixing {
  const T* A;
  int64_t C;
  const VecProjection<T>* project;
  // How column_step cuts the C rows into register blocks: `blocks` blocks of
  // `height` rows, the first `taller` of them one row taller. Fixed per call:
  // worked out per column step, its two integer divisions cost as much as
  // the whole step does for a handful of channels.
  int64_t blocks, height, taller;
  // A has no non-zero entry off its diagonal (a model's competitor at
  // initialisation, an orthonormal dictionary's D^T D): each channel then
  // needs one FMA per position instead of C, with the same bits, since the
  // dense chain adds only exact zeros to A_ii y_i (see diagonal_step).
  bool diagonal;

  ChannelMixing(const T* A_, int64_t C_, const VecProjection<T>* project_, bool diagonal_)
      : A(A_), C(C_), project(project_),
        blocks((C_ + kMaxRows - 1) / kMaxRows),
        height(blocks > 0 ? C_ / blocks : 0),
        taller(blocks > 0 ? C_ % blocks : 0),
        diagonal(diagonal_) {}
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

// max(dmax, d) of two changes |new - old| (sign bits clear), NaN-propagating:
// a NaN must never pass a stop test. Non-negative floats order like their
// bit patterns read as signed integers, and a NaN with a clear sign bit
// reads larger than +inf, so on x86 one integer max does what
// at::vec::maximum does with a compare and a blend.
template <typename T>
inline Vectorized<T> max_change(const Vectorized<T>& dmax, const Vectorized<T>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_castsi512_ps(_mm512_max_epi32(_mm512_castps_si512(dmax), _mm512_castps_si512(d)));
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_castsi512_pd(_mm512_max_epi64(_mm512_castpd_si512(dmax), _mm512_castpd_si512(d)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_castsi256_ps(_mm256_max_epi32(_mm256_castps_si256(dmax), _mm256_castps_si256(d)));
  } else if constexpr (std::is_same_v<T, double>) {
    const __m256i a = _mm256_castpd_si256(dmax), b = _mm256_castpd_si256(d);
    return _mm256_castsi256_pd(_mm256_blendv_epi8(a, b, _mm256_cmpgt_epi64(b, a)));
  }
#endif
  return at::vec::maximum(dmax, d);
}

// One iteration's new value of a vector of y: project(y - lr (mixed - b)),
// mixed being (A y) at those positions. Every path (register-blocked,
// diagonal, after a GEMM) computes it here, so the paths differ only in how
// `mixed` is summed.
template <bool SHRINK, typename T>
inline Vectorized<T> next_value(
    const VecProjection<T>& project, const Vectorized<T>& mixed, const Vectorized<T>& b,
    const Vectorized<T>& y, const Vectorized<T>& neg_lr) {
  return project.template apply<SHRINK>(at::vec::fmadd(mixed - b, neg_lr, y));
}

// next_value for the vector at y + off, stored to yn + off; with DELTA,
// |new - old| (lanes at or past `lanes` zeroed) is folded into dmax.
template <bool SHRINK, bool DELTA, typename T>
inline void update_vector(
    const VecProjection<T>& project, const Vectorized<T>& mixed, const T* y, const T* b,
    T* yn, int64_t off, const Vectorized<T>& neg_lr, int64_t lanes, Vectorized<T>& dmax) {
  using Vec = Vectorized<T>;
  const Vec old = Vec::loadu(y + off);
  const Vec nv = next_value<SHRINK>(project, mixed, Vec::loadu(b + off), old, neg_lr);
  nv.store(yn + off);
  if constexpr (DELTA) {
    dmax = max_change(dmax, masked_delta(nv, old, lanes));
  }
}

// Loops over the register block (R rows x NV vectors) must be unrolled: an
// accumulator array indexed by a loop variable lives on the stack, and every
// column step then stores, reloads and re-zeroes all R x NV accumulators.
#if defined(__clang__)
#define TORCHITER_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define TORCHITER_UNROLL _Pragma("GCC unroll 16")
#else
#define TORCHITER_UNROLL
#endif

// The NV vectors of changes of one column step: lane-wise max |new - old| of
// each vector of positions over the rows updated (zeros without DELTA).
template <typename T, int NV>
using ColumnDeltas = std::array<Vectorized<T>, NV>;

template <typename T, int NV>
inline ColumnDeltas<T, NV> zero_deltas() {
  ColumnDeltas<T, NV> d;
  d.fill(Vectorized<T>(static_cast<T>(0)));
  return d;
}

// Updates rows [i, i + R) of the NV * W positions at column s. With DELTA,
// returns max |new - old| over those rows per vector of positions (lanes at
// or past `valid` zeroed; NaN if any is NaN). R x NV accumulators share each
// broadcast of A and each load of y (a register-blocked GEMM). Deltas are
// returned by value, not folded through a pointer: the stores to yn could
// alias it, which would serialise the maxima through memory. For the same
// reason the projection's constants are copied into locals: read through
// pn.project they would be reloaded after every store.
template <typename T, int R, int NV, bool DELTA>
inline ColumnDeltas<T, NV> rows_step(
    const ChannelMixing<T>& pn, int64_t i, const T* y, const T* b, T* yn,
    int64_t ld, int64_t s, const Vectorized<T>& neg_lr, int64_t valid) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t C = pn.C;
  Vec acc[R][NV];
  TORCHITER_UNROLL
  for (int r = 0; r < R; ++r) {
    TORCHITER_UNROLL
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = Vec(static_cast<T>(0));
    }
  }
  const T* Ai = pn.A + i * C;
  for (int64_t j = 0; j < C; ++j) {
    Vec yj[NV];
    TORCHITER_UNROLL
    for (int v = 0; v < NV; ++v) {
      yj[v] = Vec::loadu(y + j * ld + s + v * W);
    }
    TORCHITER_UNROLL
    for (int r = 0; r < R; ++r) {
      const Vec a(Ai[r * C + j]);
      TORCHITER_UNROLL
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = at::vec::fmadd(a, yj[v], acc[r][v]);
      }
    }
  }
  const VecProjection<T> project = *pn.project;
  const auto finish = [&](auto shrink) {
    ColumnDeltas<T, NV> dmax = zero_deltas<T, NV>();
    TORCHITER_UNROLL
    for (int r = 0; r < R; ++r) {
      TORCHITER_UNROLL
      for (int v = 0; v < NV; ++v) {
        update_vector<decltype(shrink)::value, DELTA>(
            project, acc[r][v], y, b, yn, (i + r) * ld + s + v * W, neg_lr, valid - v * W, dmax[v]);
      }
    }
    return dmax;
  };
  return project.use_shrink ? finish(std::true_type{}) : finish(std::false_type{});
}

// Register blocking: rows_step keeps R x NV accumulators, NV loads of y and
// a broadcast of A live, so the block must fit the vector registers (32 with
// AVX-512, 16 otherwise) without spills, and R x NV >= 8 independent FMA
// chains cover the FMA latency on two ports. kMaxRows x kColumnVectors: 5 x 4
// (20 + 4 + 1 registers) with 64-byte vectors, 5 x 2 (10 + 2 + 1) otherwise.
// The blocking only decides which positions share a load: each position's
// arithmetic is the same, so every variant gives the same bits.
template <typename T>
constexpr int kColumnVectors = sizeof(Vectorized<T>) >= 64 ? 4 : 2;

// column_step for a diagonal A. The dense chain starts from +0 and adds
// A_ij y_j for every j: off the diagonal those products are exact zeros
// (for finite y), which leave a non-zero sum unchanged, so it ends at
// fma(A_ii, y_i, +0), which is what this computes (a zero may differ in its
// sign, which no later step turns into a different non-zero value). A
// non-finite y_j would make the dense sum NaN in every channel; run() redoes
// a loop whose result is not finite on the dense path.
template <typename T, int NV, bool DELTA>
inline ColumnDeltas<T, NV> diagonal_step(
    const ChannelMixing<T>& pn, const T* y, const T* b, T* yn, int64_t ld, int64_t s,
    const Vectorized<T>& neg_lr, int64_t valid) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const VecProjection<T> project = *pn.project;
  const Vec zero(static_cast<T>(0));
  const auto run = [&](auto shrink) {
    ColumnDeltas<T, NV> dmax = zero_deltas<T, NV>();
    for (int64_t i = 0; i < pn.C; ++i) {
      const Vec a(pn.A[i * pn.C + i]);
      TORCHITER_UNROLL
      for (int v = 0; v < NV; ++v) {
        const int64_t off = i * ld + s + v * W;
        update_vector<decltype(shrink)::value, DELTA>(
            project, at::vec::fmadd(a, Vec::loadu(y + off), zero), y, b, yn, off, neg_lr,
            valid - v * W, dmax[v]);
      }
    }
    return dmax;
  };
  return project.use_shrink ? run(std::true_type{}) : run(std::false_type{});
}

// Rows [0, C) in ceil(C / kMaxRows) blocks of near-equal height (e.g. C = 50:
// ten blocks of 5; C = 64: twelve of 5 and one of 4) instead of full blocks
// and a short remainder: a block of 1-2 rows does few FMAs per load.
template <typename T, int NV, bool DELTA>
inline ColumnDeltas<T, NV> column_step(
    const ChannelMixing<T>& pn, const T* y, const T* b, T* yn, int64_t ld, int64_t s,
    const Vectorized<T>& neg_lr, int64_t valid) {
  static_assert(kMaxRows == 5, "the switch below covers block heights 1..kMaxRows");
  if (pn.diagonal) {
    return diagonal_step<T, NV, DELTA>(pn, y, b, yn, ld, s, neg_lr, valid);
  }
  ColumnDeltas<T, NV> dmax = zero_deltas<T, NV>();
  int64_t i = 0;
  for (int64_t k = 0; k < pn.blocks; ++k) {
    const int64_t rows = pn.height + (k < pn.taller ? 1 : 0);
    ColumnDeltas<T, NV> d;
    switch (rows) {
      case 5: d = rows_step<T, 5, NV, DELTA>(pn, i, y, b, yn, ld, s, neg_lr, valid); break;
      case 4: d = rows_step<T, 4, NV, DELTA>(pn, i, y, b, yn, ld, s, neg_lr, valid); break;
      case 3: d = rows_step<T, 3, NV, DELTA>(pn, i, y, b, yn, ld, s, neg_lr, valid); break;
      case 2: d = rows_step<T, 2, NV, DELTA>(pn, i, y, b, yn, ld, s, neg_lr, valid); break;
      default: d = rows_step<T, 1, NV, DELTA>(pn, i, y, b, yn, ld, s, neg_lr, valid); break;
    }
    if constexpr (DELTA) {
      TORCHITER_UNROLL
      for (int v = 0; v < NV; ++v) {
        dmax[v] = max_change(dmax[v], d[v]);
      }
    }
    i += rows;
  }
  return dmax;
}

// One iteration over columns [0, n) of a block (n a multiple of the width;
// lanes at or past `valid` are padding, excluded from the delta). Every lane
// sees the same sequence of operations whichever block it falls in, so the
// blocking does not change results. With DELTA, each column step's deltas go
// to `sink(s, deltas)`, s the column of its first vector.
template <typename T, bool DELTA, typename Sink>
inline void step_columns(
    const ChannelMixing<T>& pn, const T* y, const T* b, T* yn, int64_t ld, int64_t n,
    int64_t valid, T lr, Sink&& sink) {
  constexpr int64_t W = Vectorized<T>::size();
  const Vectorized<T> neg_lr(-lr);
  constexpr int NV = kColumnVectors<T>;
  int64_t s = 0;
  for (; s + NV * W <= n; s += NV * W) {
    const auto d = column_step<T, NV, DELTA>(pn, y, b, yn, ld, s, neg_lr, valid - s);
    if constexpr (DELTA) {
      sink(s, d);
    }
  }
  if constexpr (NV > 2) {
    // A tile's last, narrower columns (n is a multiple of W, not of NV * W).
    for (; s + 2 * W <= n; s += 2 * W) {
      const auto d = column_step<T, 2, DELTA>(pn, y, b, yn, ld, s, neg_lr, valid - s);
      if constexpr (DELTA) {
        sink(s, d);
      }
    }
  }
  for (; s < n; s += W) {
    const auto d = column_step<T, 1, DELTA>(pn, y, b, yn, ld, s, neg_lr, valid - s);
    if constexpr (DELTA) {
      sink(s, d);
    }
  }
}

// step_columns; returns the lane-wise max |delta| over the block (zeros
// without DELTA).
template <typename T, bool DELTA>
inline Vectorized<T> step_block(
    const ChannelMixing<T>& pn, const T* y, const T* b, T* yn, int64_t ld, int64_t n,
    int64_t valid, T lr) {
  Vectorized<T> dmax(static_cast<T>(0));
  step_columns<T, DELTA>(pn, y, b, yn, ld, n, valid, lr, [&](int64_t, const auto& d) {
    for (const auto& dv : d) {
      dmax = max_change(dmax, dv);
    }
  });
  return dmax;
}

// step_columns, storing each position's max |delta| over the channels to
// pmax[0, n) (padding lanes 0): the per-sample loop's stop test, measured in
// the same pass as the update instead of reading y twice more.
template <typename T>
inline void step_block_positions(
    const ChannelMixing<T>& pn, const T* y, const T* b, T* yn, int64_t ld, int64_t n,
    int64_t valid, T lr, T* pmax) {
  constexpr int64_t W = Vectorized<T>::size();
  step_columns<T, true>(pn, y, b, yn, ld, n, valid, lr, [&](int64_t s, const auto& d) {
    for (size_t v = 0; v < d.size(); ++v) {
      d[v].store(pmax + s + static_cast<int64_t>(v) * W);
    }
  });
}

// The GEMM path's second half: given G = A·y for columns [0, n) of a block,
// ynext = project(y - lr (G - b)), one pass over memory. With `delta`,
// returns the lane-wise max |delta| (by value, as step_block does).
template <typename T>
inline Vectorized<T> update_block(
    const VecProjection<T>& project, int64_t C, const T* G, const T* y,
    const T* b, T* yn, int64_t ld, int64_t n, int64_t valid, T lr,
    bool delta) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec neg_lr(-lr);
  Vec dmax(static_cast<T>(0));
  const auto sweep = [&](auto shrink, auto with_delta) {
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t s = 0; s < n; s += W) {
        const int64_t off = i * ld + s;
        update_vector<decltype(shrink)::value, decltype(with_delta)::value>(
            project, Vec::loadu(G + off), y, b, yn, off, neg_lr, valid - s, dmax);
      }
    }
  };
  const auto with_shrink = [&](auto with_delta) {
    project.use_shrink ? sweep(std::true_type{}, with_delta) : sweep(std::false_type{}, with_delta);
  };
  delta ? with_shrink(std::true_type{}) : with_shrink(std::false_type{});
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
// blocks a tile touches (y, its next value, b) stay within about 40 KiB of L1;
// a multiple of step_block's full column step (kColumnVectors vectors) when
// that fits, so that no narrower steps are left over.
template <typename T>
int64_t tile_width(int64_t C) {
  constexpr int64_t W = Vectorized<T>::size();
  constexpr int64_t step = kColumnVectors<T> * W;
  const int64_t fit =
      (40 * 1024) / (3 * std::max<int64_t>(C, 1) * static_cast<int64_t>(sizeof(T)));
  const int64_t unit = fit >= step ? step : W;
  return std::clamp<int64_t>((fit / unit) * unit, W, 256);
}

// How the (batch, C, spatial) positions are laid out in the working copy:
// `groups` blocks of C rows, each row `padded_positions` long (the
// `positions` of one group, rounded up to the vector width, zero-filled).
struct WorkingLayout {
  int64_t batch, channels, spatial;
  int64_t groups;           // batch when positions are per sample, else 1
  int64_t positions;        // positions per group
  int64_t padded_positions; // positions rounded up to the vector width
  bool batch_folded;        // positions are (sample, spatial) pairs of one group
};

template <typename T>
WorkingLayout working_layout(const at::Tensor& y0, bool gemm) {
  constexpr int64_t W = Vectorized<T>::size();
  const auto [B, C, S] = batch_channel_spatial(y0);
  WorkingLayout L{B, C, S, 0, 0, 0, false};
  // Few spatial positions: gather all (sample, spatial) positions into one
  // group so that vector lanes are filled. The GEMM path multiplies A by one
  // (C, positions) matrix.
  L.batch_folded = gemm || S < 4 * W;
  L.groups = L.batch_folded ? 1 : B;
  L.positions = L.batch_folded ? B * S : S;
  L.padded_positions = (L.positions + W - 1) / W * W;
  return L;
}

// The (B, C) <-> (C, ld) transposes of a batch without spatial dims. With C
// a compile-time constant (the few channels of pca- or clustering-sized
// problems) the compiler turns the interleaved accesses into vector
// shuffles; a runtime C leaves one scalar load and store per element, which
// for 1000 x 3 costs as much as a dozen iterations of the loop.
// kC is C when it is a compile-time constant, else 0 and C is `channels`.
template <typename T, int kC>
void rows_to_columns(const T* src, int64_t B, int64_t channels, T* dst, int64_t ld) {
  const int64_t C = kC > 0 ? kC : channels;
  for (int64_t bb = 0; bb < B; ++bb) {
    TORCHITER_UNROLL
    for (int64_t c = 0; c < C; ++c) {
      dst[c * ld + bb] = src[bb * C + c];
    }
  }
}

template <typename T, int kC>
void columns_to_rows(const T* src, int64_t ld, int64_t B, int64_t channels, T* dst) {
  const int64_t C = kC > 0 ? kC : channels;
  for (int64_t bb = 0; bb < B; ++bb) {
    TORCHITER_UNROLL
    for (int64_t c = 0; c < C; ++c) {
      dst[bb * C + c] = src[c * ld + bb];
    }
  }
}

// Calls f(std::integral_constant<int, C>) for C in 1..8, else f(0) (a
// runtime C).
template <typename F>
void with_small_channels(int64_t C, F&& f) {
  switch (C) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

// Copies a (batch, C, *spatial) tensor into the working layout. Plain loops:
// for the small problems this op is for, ATen's reshape/permute/copy chain
// would cost more than the whole loop.
template <typename T>
at::Tensor to_working(const at::Tensor& t, const WorkingLayout& L) {
  const at::Tensor src_t = t.contiguous();
  const T* src = src_t.const_data_ptr<T>();
  const int64_t B = L.batch, C = L.channels, S = L.spatial, ld = L.padded_positions;
  at::Tensor out = at::empty({L.groups, C, ld}, t.options().memory_format(at::MemoryFormat::Contiguous));
  T* dst = out.data_ptr<T>();
  if (L.batch_folded && S == 1) {
    // (B, C) -> (C, B): each sample's C values read in order, one store to
    // each row (a loop over a length-1 spatial dim per element would cost
    // several times the copy itself).
    with_small_channels(C, [&](auto small) {
      rows_to_columns<T, decltype(small)::value>(src, B, C, dst, ld);
    });
    for (int64_t c = 0; c < C; ++c) {
      std::fill(dst + c * ld + L.positions, dst + (c + 1) * ld, T(0));
    }
    return out;
  }
  for (int64_t g = 0; g < L.groups; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      T* row = dst + (g * C + c) * ld;
      if (L.batch_folded) {
        // Element loops, not copy_n: S is often 1 (a transpose).
        for (int64_t bb = 0; bb < B; ++bb) {
          for (int64_t s = 0; s < S; ++s) {
            row[bb * S + s] = src[(bb * C + c) * S + s];
          }
        }
      } else {
        std::copy_n(src + (g * C + c) * S, S, row);
      }
      std::fill(row + L.positions, row + ld, T(0));
    }
  }
  return out;
}

// The inverse of to_working: a contiguous tensor of `like`'s shape.
template <typename T>
at::Tensor from_working(const at::Tensor& Y, const WorkingLayout& L, const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  const T* src = Y.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t B = L.batch, C = L.channels, S = L.spatial, ld = L.padded_positions;
  if (L.batch_folded && S == 1) {
    with_small_channels(C, [&](auto small) {
      columns_to_rows<T, decltype(small)::value>(src, ld, B, C, dst);
    });
    return out;
  }
  for (int64_t g = 0; g < L.groups; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      const T* row = src + (g * C + c) * ld;
      if (L.batch_folded) {
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
  return out;
}

// The fixed tiles of positions the iterations are split into. A tile lies
// within one group; tiles, not threads, decide what a vector holds, so the
// split over threads does not change any result.
struct Tiles {
  int64_t width;     // positions per tile (a multiple of the vector width)
  int64_t per_group;
  int64_t count;
  int64_t grain;     // tiles per parallel task: ~64k FMAs, so small problems
                     // stay on the calling thread
  const WorkingLayout* L;

  // Offset of tile t's first element, its width n and how many of those
  // positions are real (not padding).
  void bounds(int64_t t, int64_t& off, int64_t& n, int64_t& valid) const {
    const int64_t g = t / per_group;
    const int64_t s0 = (t % per_group) * width;
    off = g * L->channels * L->padded_positions + s0;
    n = std::min(width, L->padded_positions - s0);
    valid = std::max<int64_t>(0, std::min(width, L->positions - s0));
  }
};

template <typename T>
Tiles make_tiles(const WorkingLayout& L, bool gemm, bool diagonal) {
  constexpr int64_t W = Vectorized<T>::size();
  const int64_t C = L.channels;
  Tiles tl;
  tl.width = gemm ? 64 * W : tile_width<T>(C);
  tl.per_group = (L.padded_positions + tl.width - 1) / tl.width;
  tl.count = L.groups * tl.per_group;
  const int64_t work_per_tile = gemm || diagonal ? C * tl.width : C * C * tl.width;
  tl.grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_tile));
  tl.L = &L;
  return tl;
}

// NaN-propagating max: a NaN change must never pass a stop test.
template <typename T>
T nan_max(T a, T b) {
  return std::isnan(a) || std::isnan(b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

template <typename T>
T nan_max_of(const std::vector<T>& v) {
  T m = 0;
  for (T x : v) {
    m = nan_max(m, x);
  }
  return m;
}

// What a loop measures for quadratic_descent_ex, on the host: per sample
// (per_sample) or for the whole batch (one entry).
template <typename T>
struct LoopStats {
  std::vector<int64_t> iterations;
  std::vector<uint8_t> converged;
  std::vector<T> first, last;
  std::vector<T> trace; // max_iterations entries with trace, NaN until run

  LoopStats(int64_t n, const QuadraticDescentArgs& args)
      : iterations(static_cast<size_t>(n), 0), converged(static_cast<size_t>(n), 0),
        first(static_cast<size_t>(n), 0), last(static_cast<size_t>(n), 0),
        trace(static_cast<size_t>(args.trace ? args.max_iterations : 0),
              std::numeric_limits<T>::quiet_NaN()) {}

  // Records the change of iteration k for entry i.
  void measured(size_t i, int64_t k, T change) {
    if (k == 0) {
      first[i] = change;
    }
    last[i] = change;
  }
};

// Where run_blocked reads y0 and b and writes the result: C rows of
// `row_stride` elements per group, groups `group_stride` apart. Either the
// working copies (row_stride = padded_positions) or, when positions are per
// sample, the (batch, C, spatial) tensors themselves (row_stride = spatial):
// the tile copies already do the packing, so no working copy is made.
template <typename T>
struct BlockedIO {
  const T* y;
  const T* b;
  T* out;
  int64_t row_stride, group_stride;
};

// No stop test: each tile is copied into three tile-local C x width blocks
// (allocated once per task, never per iteration; lanes past the real
// positions zero-filled) and runs all K iterations there before its result
// is written out. With `stats` the first and the last iteration also
// measure their change.
template <typename T>
void run_blocked(
    const BlockedIO<T>& io, const ChannelMixing<T>& mix,
    const Tiles& tiles, int64_t K, LearningRates& lrs, LoopStats<T>* stats,
    InterruptPoll& poll) {
  const int64_t C = mix.C;
  // All K iterations run and every tile needs every rate: a schedule's are
  // read once, up front.
  const T lr = static_cast<T>(lrs.at(0));
  std::vector<T> scheduled(lrs.scheduled() ? static_cast<size_t>(K) : 0);
  for (size_t k = 0; k < scheduled.size(); ++k) {
    scheduled[k] = static_cast<T>(lrs.at(static_cast<int64_t>(k)));
  }
  const int64_t T_w = tiles.width;
  const int64_t ld = io.row_stride;
  std::vector<T> first_max(stats ? static_cast<size_t>(tiles.count) : 0);
  std::vector<T> last_max(first_max.size());
  // Threads take `per_grab` tiles at a time from a shared counter instead of
  // a fixed half each: a core slowed by other work (another process, a
  // neighbouring VM) then does fewer tiles rather than holding the other
  // back at the end. Which tiles a thread gets never changes what a tile
  // computes, so results stay bitwise the same.
  const int64_t per_grab = std::max<int64_t>(1, tiles.grain / std::max<int64_t>(K, 1));
  const int64_t grabs = (tiles.count + per_grab - 1) / per_grab;
  std::atomic<int64_t> next_tile{0};
  const auto worker = [&](int64_t, int64_t) {
    std::vector<T> local(static_cast<size_t>(3 * C * T_w));
    T* cur = local.data();
    T* nxt = cur + C * T_w;
    T* bl = nxt + C * T_w;
    const auto run_tile = [&](int64_t t) {
      int64_t unused, n, valid;
      tiles.bounds(t, unused, n, valid);
      const int64_t off = t / tiles.per_group * io.group_stride + t % tiles.per_group * T_w;
      for (int64_t c = 0; c < C; ++c) {
        std::copy_n(io.y + off + c * ld, valid, cur + c * T_w);
        std::fill(cur + c * T_w + valid, cur + c * T_w + n, T(0));
        std::copy_n(io.b + off + c * ld, valid, bl + c * T_w);
        std::fill(bl + c * T_w + valid, bl + c * T_w + n, T(0));
      }
      T* src = cur;
      T* dst = nxt;
      for (int64_t k = 0; k < K; ++k) {
        // A tile of a wide layer can take seconds over all K iterations.
        if ((k & 15) == 15 && poll.stop()) {
          return;
        }
        const T lr_k = scheduled.empty() ? lr : scheduled[static_cast<size_t>(k)];
        if (stats && (k == 0 || k == K - 1)) {
          const T m = lane_max(step_block<T, true>(mix, src, bl, dst, T_w, n, valid, lr_k));
          if (k == 0) {
            first_max[static_cast<size_t>(t)] = m;
          }
          if (k == K - 1) {
            last_max[static_cast<size_t>(t)] = m;
          }
        } else {
          step_block<T, false>(mix, src, bl, dst, T_w, n, valid, lr_k);
        }
        std::swap(src, dst);
      }
      for (int64_t c = 0; c < C; ++c) {
        std::copy_n(src + c * T_w, valid, io.out + off + c * ld);
      }
    };
    for (int64_t t0; (t0 = next_tile.fetch_add(per_grab, std::memory_order_relaxed)) < tiles.count;) {
      if (poll.stop()) {
        return;
      }
      for (int64_t t = t0; t < std::min(tiles.count, t0 + per_grab); ++t) {
        run_tile(t);
      }
    }
  };
  if (grabs > 1) {
    at::parallel_for(0, grabs, 1, worker);
  } else {
    worker(0, grabs);  // small problems stay on the calling thread
  }
  if (stats) {
    stats->measured(0, 0, nan_max_of(first_max));
    stats->measured(0, K - 1, nan_max_of(last_max));
    stats->iterations[0] = K;
  }
}

// No stop test and a diagonal A: every element follows its own scalar
// recurrence y <- project(y - lr_k (A_cc y - b)), so each run of
// kDiagonalVectors vectors of a channel row goes through all K iterations in
// registers, one read and one write of y in total, with no tiles and no
// copies. The operations are diagonal_step's, element for element, so the
// results are those of the tiled path. `groups` groups of C rows of
// `positions` elements (io's strides); with `stats` the first and the last
// iteration measure their change.
constexpr int kDiagonalVectors = 8;

template <typename T>
void run_diagonal(
    const BlockedIO<T>& io, const ChannelMixing<T>& mix, int64_t groups, int64_t positions,
    int64_t K, LearningRates& lrs, LoopStats<T>* stats, InterruptPoll& poll) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kRun = kDiagonalVectors * W;
  const int64_t C = mix.C;
  std::vector<T> neg_rates(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    neg_rates[static_cast<size_t>(k)] = static_cast<T>(-lrs.at(k));
  }
  const int64_t rows = groups * C;
  std::vector<T> first_max(stats ? static_cast<size_t>(rows) : 0);
  std::vector<T> last_max(first_max.size());
  const VecProjection<T> project = *mix.project;
  const Vec zero(static_cast<T>(0));
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, positions * K));
  const auto run_rows = [&](int64_t r0, int64_t r1, auto shrink) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r / C * io.group_stride + r % C * io.row_stride;
      const Vec a(mix.A[(r % C) * (C + 1)]);
      Vec d_first(static_cast<T>(0)), d_last(static_cast<T>(0));
      for (int64_t s = 0; s < positions; s += kRun) {
        const int64_t n = std::min(kRun, positions - s);
        Vec y[kDiagonalVectors], b[kDiagonalVectors];
        TORCHITER_UNROLL
        for (int v = 0; v < kDiagonalVectors; ++v) {
          // Lanes past n load as zeros; they are never stored.
          const int64_t lanes = std::clamp<int64_t>(n - v * W, 0, W);
          y[v] = lanes == W ? Vec::loadu(io.y + off + s + v * W) : Vec::loadu(io.y + off + s + v * W, lanes);
          b[v] = lanes == W ? Vec::loadu(io.b + off + s + v * W) : Vec::loadu(io.b + off + s + v * W, lanes);
        }
        for (int64_t k = 0; k < K; ++k) {
          // A run goes through all K iterations: with a large K it alone
          // can take seconds.
          if ((k & 1023) == 1023 && poll.stop()) {
            return;
          }
          const Vec neg_lr(neg_rates[static_cast<size_t>(k)]);
          const bool measure = stats && (k == 0 || k == K - 1);
          TORCHITER_UNROLL
          for (int v = 0; v < kDiagonalVectors; ++v) {
            const Vec old = y[v];
            y[v] = next_value<decltype(shrink)::value>(project, at::vec::fmadd(a, old, zero), b[v], old, neg_lr);
            if (measure) {
              const Vec d = masked_delta(y[v], old, n - v * W);
              if (k == 0) {
                d_first = max_change(d_first, d);
              }
              if (k == K - 1) {
                d_last = max_change(d_last, d);
              }
            }
          }
        }
        TORCHITER_UNROLL
        for (int v = 0; v < kDiagonalVectors; ++v) {
          const int64_t lanes = std::clamp<int64_t>(n - v * W, 0, W);
          if (lanes == W) {
            y[v].store(io.out + off + s + v * W);
          } else if (lanes > 0) {
            y[v].store(io.out + off + s + v * W, static_cast<int>(lanes));
          }
        }
      }
      if (stats) {
        first_max[static_cast<size_t>(r)] = lane_max(d_first);
        last_max[static_cast<size_t>(r)] = lane_max(d_last);
      }
    }
  };
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    project.use_shrink ? run_rows(r0, r1, std::true_type{}) : run_rows(r0, r1, std::false_type{});
  });
  if (stats) {
    stats->measured(0, 0, nan_max_of(first_max));
    stats->measured(0, K - 1, nan_max_of(last_max));
    stats->iterations[0] = K;
  }
}

// One parallel pass per iteration from Y into a second buffer and back
// (after a GEMM into G on the GEMM path); when iteration k is a check, each
// tile records its max |y_k - y_{k-1}| and the loop stops once the maximum
// is below tol. With `stats` the first and the last iteration (and with a
// trace every one) are measured too. Y holds the result; returns the
// iterations run.
template <typename T>
int64_t run_sweeps(
    at::Tensor& Y, const at::Tensor& Bw, const at::Tensor& A,
    const ChannelMixing<T>& mix, const Tiles& tiles, bool gemm,
    const QuadraticDescentArgs& args, LearningRates& lrs, LoopStats<T>* stats,
    InterruptPoll& poll) {
  const int64_t C = mix.C;
  const int64_t ld = tiles.L->padded_positions;
  const int64_t K = args.max_iterations;
  const bool stop_test = args.tol > 0;
  const T* b = Bw.const_data_ptr<T>();
  at::Tensor Y2 = at::empty_like(Y);
  at::Tensor G = gemm ? at::empty({C, ld}, Y.options()) : at::Tensor();
  std::vector<T> tile_max(static_cast<size_t>(tiles.count));
  at::Tensor src_t = Y;
  at::Tensor dst_t = Y2;
  int64_t iterations = K;
  for (int64_t k = 0; k < K; ++k) {
    // Every 8 sweeps, so that a poll is a negligible share of a small one.
    if ((k & 7) == 0) {
      poll.stop();
    }
    const bool check = stop_test && k >= 1 && k % args.check_every == 0;
    const bool measure = check || (stats && (k == 0 || k == K - 1 || args.trace));
    const T lr = static_cast<T>(lrs.at(k));
    const T* src = src_t.const_data_ptr<T>();
    T* dst = dst_t.data_ptr<T>();
    if (gemm) {
      at::mm_out(G, A, src_t.view({C, ld}));
    }
    const T* g = gemm ? G.const_data_ptr<T>() : nullptr;
    at::parallel_for(0, tiles.count, tiles.grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t off, n, valid;
        tiles.bounds(t, off, n, valid);
        Vectorized<T> dmax(static_cast<T>(0));
        if (gemm) {
          dmax = update_block<T>(*mix.project, C, g + off, src + off, b + off, dst + off, ld, n, valid, lr, measure);
        } else if (measure) {
          dmax = step_block<T, true>(mix, src + off, b + off, dst + off, ld, n, valid, lr);
        } else {
          step_block<T, false>(mix, src + off, b + off, dst + off, ld, n, valid, lr);
        }
        tile_max[static_cast<size_t>(t)] = lane_max(dmax);
      }
    });
    std::swap(src_t, dst_t);
    if (!measure) {
      continue;
    }
    const T m = nan_max_of(tile_max);
    if (stats) {
      stats->measured(0, k, m);
      if (args.trace) {
        stats->trace[static_cast<size_t>(k)] = m;
      }
    }
    // NaN < tol is false: a diverged loop never counts as converged.
    if (check && m < static_cast<T>(args.tol)) {
      iterations = k + 1;
      if (stats) {
        stats->converged[0] = 1;
      }
      break;
    }
  }
  Y = src_t;
  if (stats) {
    stats->iterations[0] = iterations;
  }
  return iterations;
}

// Copies n elements; a plain loop, because n is often 1 (a sample without
// spatial dims) and a memmove call per element would cost more than the copy.
template <typename T>
inline void copy_short(const T* from, int64_t n, T* to) {
  for (int64_t i = 0; i < n; ++i) {
    to[i] = from[i];
  }
}

// quadratic_descent_ex with per_sample: the sweeps of run_sweeps on the
// batch-folded layout, where each sample owns S consecutive positions (a
// slot). The working copies hold the running samples only, in slots
// [0, n): a sample that passes its stop test is written to `out` and the
// last running sample moves into its slot (y and b, C x S elements each),
// so every sweep covers the running samples and nothing else, and each
// sample is moved at most once per stop instead of the whole batch being
// repacked. Rows keep their stride; only the swept width shrinks. Positions
// never interact and every lane sees the same operations wherever it sits,
// so a sample's result is the one it would get alone, in any slot.
template <typename T>
void run_per_sample(
    const at::Tensor& y0, const at::Tensor& b_in, const at::Tensor& A,
    const ChannelMixing<T>& mix, bool gemm, const QuadraticDescentArgs& args,
    LearningRates& lrs, at::Tensor& out, LoopStats<T>& stats, InterruptPoll& poll) {
  constexpr int64_t W = Vectorized<T>::size();
  WorkingLayout L = working_layout<T>(y0, /*fold the batch=*/true);
  const int64_t C = L.channels, S = L.spatial, K = args.max_iterations;
  const int64_t ld = L.padded_positions;  // row stride, fixed
  at::Tensor src_t = to_working<T>(y0, L);
  at::Tensor dst_t = at::empty_like(src_t);
  at::Tensor Bw = to_working<T>(b_in, L);
  at::Tensor G = gemm ? at::empty_like(src_t) : at::Tensor();
  T* b = Bw.data_ptr<T>();
  Tiles tiles = make_tiles<T>(L, gemm, mix.diagonal);
  std::vector<T> position_max(static_cast<size_t>(ld));
  // The original index of the sample in each slot.
  std::vector<int64_t> present(static_cast<size_t>(L.batch));
  std::iota(present.begin(), present.end(), 0);
  int64_t n = L.batch;
  T* o = out.data_ptr<T>();
  // A slot's sample into its place in `out`: C x S contiguous elements.
  // With one position per sample (S == 1) the copies are single elements:
  // written out as such, a copy loop per element costs several times more.
  const auto write_out = [&](const T* y, int64_t slot) {
    T* to = o + present[static_cast<size_t>(slot)] * C * S;
    if (S == 1) {
      for (int64_t c = 0; c < C; ++c) {
        to[c] = y[c * ld + slot];
      }
      return;
    }
    for (int64_t c = 0; c < C; ++c) {
      copy_short(y + c * ld + slot * S, S, to + c * S);
    }
  };
  const auto move_slot = [&](T* y, int64_t from, int64_t to) {
    if (S == 1) {
      for (int64_t c = 0; c < C; ++c) {
        y[c * ld + to] = y[c * ld + from];
        b[c * ld + to] = b[c * ld + from];
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        copy_short(y + c * ld + from * S, S, y + c * ld + to * S);
        copy_short(b + c * ld + from * S, S, b + c * ld + to * S);
      }
    }
    present[static_cast<size_t>(to)] = present[static_cast<size_t>(from)];
  };
  std::vector<int64_t> stopped;              // slots stopping now, increasing
  // (from, to) slots of the running samples still to move, `to` increasing.
  std::vector<std::pair<int64_t, int64_t>> moves;
  const auto apply_moves = [&](int64_t m0, int64_t m1) {
    T* y = src_t.data_ptr<T>();
    at::parallel_for(m0, m1, 64, [&](int64_t a, int64_t e) {
      for (int64_t m = a; m < e; ++m) {
        move_slot(y, moves[static_cast<size_t>(m)].first, moves[static_cast<size_t>(m)].second);
      }
    });
  };
  std::vector<uint8_t> stopping(present.size(), 0);

  // One position per sample: the tiles make the stop test themselves, lane
  // by lane, and list the slots that stop, so the host visits only those.
  const bool one_position = S == 1;
  const Vectorized<T> tol_vec(static_cast<T>(args.tol));
  std::vector<std::vector<int64_t>> tile_hits;
  int64_t k = 0;
  while (k < K && n > 0) {
    if ((k & 7) == 0) {
      poll.stop();
    }
    const bool check = args.tol > 0 && k >= 1 && k % args.check_every == 0;
    const bool measure = check || k == 0 || k == K - 1 || args.trace;
    const T lr = static_cast<T>(lrs.at(k));
    const T* src = src_t.const_data_ptr<T>();
    T* dst = dst_t.data_ptr<T>();
    if (gemm) {
      // The GEMM reads every slot: the moves go first.
      apply_moves(0, static_cast<int64_t>(moves.size()));
      moves.clear();
      const int64_t np = L.padded_positions;
      at::Tensor g = column_block_view(G, C, np, ld);
      at::mm_out(g, A, column_block_view(src_t, C, np, ld));
    }
    const T* g = gemm ? G.const_data_ptr<T>() : nullptr;
    T* pmax = position_max.data();
    T* src_mut = src_t.data_ptr<T>();
    tile_hits.resize(static_cast<size_t>(tiles.count));
    // On a plain stop test with one position per sample, the tiles stop
    // their own samples (statistics, result written out): each touches its
    // own samples only, so that work is spread over the threads too.
    const bool record_next = k + 1 == 1 || k + 1 == K || args.trace;
    const bool stop_in_tiles = one_position && check && !record_next;
    at::parallel_for(0, tiles.count, tiles.grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t off, w, valid;
        tiles.bounds(t, off, w, valid);
        if (!moves.empty()) {
          // The running samples moving into this tile's slots, just before
          // the tile reads them (the slots' lines are then in cache).
          const auto first = std::lower_bound(
              moves.begin(), moves.end(), off, [](const auto& m, int64_t v) { return m.second < v; });
          for (auto it = first; it != moves.end() && it->second < off + w; ++it) {
            move_slot(src_mut, it->first, it->second);
          }
        }
        if (gemm) {
          update_block<T>(*mix.project, C, g + off, src + off, b + off, dst + off, ld, w, valid, lr, false);
        } else if (measure) {
          step_block_positions<T>(mix, src + off, b + off, dst + off, ld, w, valid, lr, pmax + off);
        } else {
          step_block<T, false>(mix, src + off, b + off, dst + off, ld, w, valid, lr);
        }
        if (!measure) {
          continue;
        }
        std::vector<int64_t>& hits = tile_hits[static_cast<size_t>(t)];
        hits.clear();
        for (int64_t s = 0; s < w; s += W) {
          Vectorized<T> m(static_cast<T>(0));
          if (gemm) {
            // After a GEMM the update is a plain sweep: the changes take
            // one more pass over the tile (in cache).
            for (int64_t c = 0; c < C; ++c) {
              const int64_t e = off + c * ld + s;
              m = max_change(m, (Vectorized<T>::loadu(dst + e) - Vectorized<T>::loadu(src + e)).abs());
            }
            m.store(pmax + off + s);
          } else {
            m = Vectorized<T>::loadu(pmax + off + s);
          }
          const int64_t lanes = std::min<int64_t>(W, valid - s);
          if (one_position && check && lanes > 0) {
            // zero_mask: a bit per lane that is not below tol (NaN never is).
            auto bits = static_cast<uint64_t>(~(m < tol_vec).zero_mask()) & ((uint64_t{1} << lanes) - 1);
            for (int64_t lane = 0; bits != 0; ++lane, bits >>= 1) {
              if (bits & 1) {
                const int64_t slot = off + s + lane;
                hits.push_back(slot);
                if (stop_in_tiles) {
                  const auto orig = static_cast<size_t>(present[static_cast<size_t>(slot)]);
                  stats.measured(orig, k, pmax[slot]);
                  stats.converged[orig] = 1;
                  stats.iterations[orig] = k + 1;
                  write_out(dst, slot);
                }
              }
            }
          }
        }
      }
    });
    moves.clear();
    std::swap(src_t, dst_t);
    ++k;
    if (!measure) {
      continue;
    }
    // Statistics are kept at the first and the last iteration, at each stop
    // and for a trace; a plain stop test only compares.
    const bool record = k == 1 || k == K || args.trace;
    const T tol = static_cast<T>(args.tol);
    T iteration_max = 0;
    const auto stop_sample = [&](int64_t i, T m) {
      const auto orig = static_cast<size_t>(present[static_cast<size_t>(i)]);
      stats.measured(orig, k - 1, m);
      stats.converged[orig] = 1;
      stats.iterations[orig] = k;
      stopped.push_back(i);
    };
    T* y = src_t.data_ptr<T>();
    if (stop_in_tiles) {
      for (const auto& hits : tile_hits) {
        for (int64_t i : hits) {
          stopped.push_back(i);
          stopping[static_cast<size_t>(i)] = 1;
        }
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const T* p = pmax + i * S;
        T m = p[0];
        for (int64_t s = 1; s < S; ++s) {
          m = nan_max(m, p[s]);
        }
        if (args.trace) {
          iteration_max = nan_max(iteration_max, m);
        }
        if (check && m < tol) {
          stop_sample(i, m);
        } else if (record) {
          stats.measured(static_cast<size_t>(present[static_cast<size_t>(i)]), k - 1, m);
        }
      }
      for (int64_t i : stopped) {
        write_out(y, i);
        stopping[static_cast<size_t>(i)] = 1;
      }
    }
    if (args.trace) {
      stats.trace[static_cast<size_t>(k - 1)] = iteration_max;
    }
    if (stopped.empty()) {
      continue;
    }
    // The stopped samples are out: running ones from the end move into
    // their slots. The pairs are worked out here and copied by the next
    // sweep, each by the tile its slot falls in; no slot is both a source
    // and a destination, and the sources lie past the slots swept.
    for (int64_t i : stopped) {
      while (n > 0 && stopping[static_cast<size_t>(n - 1)]) {
        stopping[static_cast<size_t>(--n)] = 0;
      }
      if (i >= n) {
        break;
      }
      moves.emplace_back(n - 1, i);
      stopping[static_cast<size_t>(i)] = 0;
      --n;
    }
    while (n > 0 && stopping[static_cast<size_t>(n - 1)]) {
      stopping[static_cast<size_t>(--n)] = 0;
    }
    stopped.clear();
    L.positions = n * S;
    L.padded_positions = (L.positions + W - 1) / W * W;
    tiles = make_tiles<T>(L, gemm, mix.diagonal);
  }
  apply_moves(0, static_cast<int64_t>(moves.size()));
  const T* y = src_t.const_data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    stats.iterations[static_cast<size_t>(present[static_cast<size_t>(i)])] = k;
    write_out(y, i);
  }
}

// True when every entry of the (C, C) row-major A off its diagonal is zero.
template <typename T>
bool is_diagonal(const T* A, int64_t C) {
  for (int64_t i = 0; i < C; ++i) {
    for (int64_t j = 0; j < C; ++j) {
      if (i != j && A[i * C + j] != T(0)) {
        return false;
      }
    }
  }
  return true;
}

// True when no element of t is infinite or NaN: x - x is 0 for every finite
// x and NaN otherwise, and a NaN stays in the running sum.
template <typename T>
bool all_finite(const at::Tensor& t) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const at::Tensor c = t.contiguous();
  const T* p = c.const_data_ptr<T>();
  const int64_t n = c.numel();
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, int64_t{1} << 16, [&](int64_t i0, int64_t i1) {
    Vec sum(static_cast<T>(0));
    int64_t i = i0;
    for (; i + W <= i1; i += W) {
      const Vec x = Vec::loadu(p + i);
      sum = sum + (x - x);
    }
    T tail = 0;
    for (; i < i1; ++i) {
      tail += p[i] - p[i];
    }
    if (!std::isfinite(lane_max(sum)) || std::isnan(tail)) {
      finite.store(false, std::memory_order_relaxed);
    }
  });
  return finite.load();
}

template <typename T>
QuadraticDescentResult run(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b_in,
    const QuadraticDescentArgs& args, LearningRates& lrs, bool diagonal) {
  // A diagonal A needs no GEMM: the mixing is one FMA per element.
  const bool gemm = y0.size(1) >= kGemmMinChannels && !diagonal;
  const VecProjection<T> proj(args.shrink, args.min, args.max);
  const int64_t B = y0.size(0);
  std::optional<LoopStats<T>> stats;
  if (args.stats) {
    stats.emplace(args.per_sample ? B : 1, args);
  }
  at::Tensor y;
  int64_t iterations = args.max_iterations;
  InterruptPoll poll;
  if (args.per_sample) {
    y = at::empty(y0.sizes(), y0.options().memory_format(at::MemoryFormat::Contiguous));
    const ChannelMixing<T> mix(A.const_data_ptr<T>(), y0.size(1), &proj, diagonal);
    run_per_sample<T>(y0, b_in, A, mix, gemm, args, lrs, y, *stats, poll);
  } else {
    const WorkingLayout L = working_layout<T>(y0, gemm);
    const ChannelMixing<T> mix(A.const_data_ptr<T>(), L.channels, &proj, diagonal);
    const Tiles tiles = make_tiles<T>(L, gemm, diagonal);
    LoopStats<T>* st = stats ? &*stats : nullptr;
    const bool blocked = !(args.tol > 0 || gemm || args.trace);
    const auto run_without_test = [&](const BlockedIO<T>& io) {
      if (diagonal) {
        run_diagonal<T>(io, mix, L.groups, L.positions, args.max_iterations, lrs, st, poll);
      } else {
        run_blocked<T>(io, mix, tiles, args.max_iterations, lrs, st, poll);
      }
    };
    if (blocked && !L.batch_folded) {
      // Tiles straight from the inputs into the output: no working copies
      // (for a large conv layer they cost as much as the loop's own time).
      const at::Tensor yc = y0.contiguous();
      const at::Tensor bc = b_in.contiguous();
      y = at::empty(y0.sizes(), y0.options().memory_format(at::MemoryFormat::Contiguous));
      const int64_t S = L.spatial;
      run_without_test({yc.const_data_ptr<T>(), bc.const_data_ptr<T>(), y.data_ptr<T>(), S, L.channels * S});
    } else {
      at::Tensor Y = to_working<T>(y0, L);
      const at::Tensor Bw = to_working<T>(b_in, L);
      if (blocked) {
        const int64_t ld = L.padded_positions;
        run_without_test({Y.const_data_ptr<T>(), Bw.const_data_ptr<T>(), Y.data_ptr<T>(), ld, L.channels * ld});
      } else {
        iterations = run_sweeps<T>(Y, Bw, A, mix, tiles, gemm, args, lrs, st, poll);
      }
      y = from_working<T>(Y, L, y0);
    }
  }
  if (!stats) {
    return {y, at::scalar_tensor(iterations, y0.options().dtype(at::kLong))};
  }
  const auto wide = [](const std::vector<T>& v) { return std::vector<double>(v.begin(), v.end()); };
  return make_ex_result_host(
      y, stats->iterations, stats->converged, wide(stats->first), wide(stats->last),
      wide(stats->trace), args.per_sample);
}

} // namespace

QuadraticDescentResult quadratic_descent_kernel(
    const at::Tensor& y0,
    const at::Tensor& A,
    const at::Tensor& b,
    const QuadraticDescentArgs& args,
    LearningRates& lrs) {
  return AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "torchiter.quadratic_descent", [&] {
    const at::Tensor Ac = A.contiguous();
    if (is_diagonal(Ac.const_data_ptr<scalar_t>(), y0.size(1))) {
      QuadraticDescentResult r = run<scalar_t>(y0, Ac, b, args, lrs, /*diagonal=*/true);
      // Where the loop met an infinity or a NaN, the dense chain's
      // 0 * inf = NaN would have spread it to every channel of the position:
      // such a loop is run again the dense way, so that results never
      // depend on the shape of A.
      if (all_finite<scalar_t>(r.y)) {
        return r;
      }
    }
    return run<scalar_t>(y0, Ac, b, args, lrs, /*diagonal=*/false);
  });
}

} // namespace torchiter::cpu::CPU_CAPABILITY
