// Step primitives of the quadratic_descent kernel: the channel mixing of a
// block of positions (register-blocked broadcast-FMA chains, the diagonal
// case, column steps), the projected update of each lane and the lane-wise
// change it makes. Everything here works on registers and one tile; nothing
// allocates, loops over iterations or knows the tensor layout.
//
// Part of the CPU quadratic_descent kernel: included by quadratic_descent.cpp
// alone, once per instruction-set variant (see kernels.h), so its internal
// linkage gives every variant its own copy.
#pragma once

#include "../kernels.h"
#include "../vec_math.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;


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
  // Set only where the mixing runs on bfloat16 dot products (bf16_mixing
  // below): A rounded to bfloat16, row i's pairs (A_i,2p, A_i,2p+1) as one
  // 32-bit word each, `pairs` = ceil(C / 2) words per row (an odd C's last
  // pair ends in a zero).
  const uint32_t* A_pairs = nullptr;
  int64_t pairs = 0;
  // Set only where the bfloat16 mixing runs on AMX tiles (amx.h): A's pairs
  // in rows of `tile_pairs` words (ceil(C / 2) rounded up to 16), C rounded
  // up to 32 rows, zero-padded; on the tile emulation if `amx_emulated`.
  const uint32_t* A_tiles = nullptr;
  int64_t tile_pairs = 0;
  bool amx_emulated = false;

  ChannelMixing(const T* A_, int64_t C_, const VecProjection<T>* project_, bool diagonal_)
      : A(A_), C(C_), project(project_),
        blocks((C_ + kMaxRows - 1) / kMaxRows),
        height(blocks > 0 ? C_ / blocks : 0),
        taller(blocks > 0 ? C_ % blocks : 0),
        diagonal(diagonal_) {}
};

// x rounded up to a multiple of k.
constexpr int64_t round_up(int64_t x, int64_t k) {
  return (x + k - 1) / k * k;
}

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
// A column step of a few channels is a few hundred FMAs: called out of line
// (GCC's choice where the step's deltas go to memory, as in the per-sample
// loop) it ran a third slower than inlined, reloading the mixing's fields
// and re-zeroing its accumulators around every call.
#if defined(__GNUC__) || defined(__clang__)
#define TORCHITER_INLINE inline __attribute__((always_inline))
#else
#define TORCHITER_INLINE inline
#endif

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

// The update of rows [i, i + R) of the NV * W positions at column s, given
// their mixed values acc = (A y) there: next_value stored to yn, and with
// DELTA the lane-wise max |new - old| per vector of positions.
template <typename T, int R, int NV, bool DELTA>
inline ColumnDeltas<T, NV> finish_rows(
    const ChannelMixing<T>& pn, const Vectorized<T> (&acc)[R][NV], int64_t i, const T* y, const T* b,
    T* yn, int64_t ld, int64_t s, const Vectorized<T>& neg_lr, int64_t valid) {
  constexpr int64_t W = Vectorized<T>::size();
  const VecProjection<T> project = *pn.project;
  const auto finish = [&](auto shrink) {
    ColumnDeltas<T, NV> dmax = zero_deltas<T, NV>();
    // One pointer per array, stepped a row at a time: with every row's
    // offset written out, GCC computed all 3 x R addresses up front and
    // spilled them to the stack, and the update took a sixth of a C = 50
    // column step (1 thread: 81% of the FMA peak, 86% stepped).
    const int64_t first = i * ld + s;
    const T* yr = y + first;
    const T* br = b + first;
    T* ynr = yn + first;
    TORCHITER_UNROLL
    for (int r = 0; r < R; ++r) {
      TORCHITER_UNROLL
      for (int v = 0; v < NV; ++v) {
        update_vector<decltype(shrink)::value, DELTA>(
            project, acc[r][v], yr, br, ynr, v * W, neg_lr, valid - v * W, dmax[v]);
      }
      yr += ld;
      br += ld;
      ynr += ld;
    }
    return dmax;
  };
  return project.use_shrink ? finish(std::true_type{}) : finish(std::false_type{});
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
  return finish_rows<T, R, NV, DELTA>(pn, acc, i, y, b, yn, ld, s, neg_lr, valid);
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
// and a short remainder: a block of 1-2 rows does few FMAs per load. Calls
// rows(std::integral_constant<int, R>{}, i) for the block of R rows from row
// i and folds the deltas it returns.
template <typename T, int NV, bool DELTA, typename Rows>
TORCHITER_INLINE ColumnDeltas<T, NV> over_row_blocks(const ChannelMixing<T>& pn, Rows&& rows_of) {
  static_assert(kMaxRows == 5, "the switch below covers block heights 1..kMaxRows");
  ColumnDeltas<T, NV> dmax = zero_deltas<T, NV>();
  int64_t i = 0;
  for (int64_t k = 0; k < pn.blocks; ++k) {
    const int64_t rows = pn.height + (k < pn.taller ? 1 : 0);
    ColumnDeltas<T, NV> d;
    switch (rows) {
      case 5: d = rows_of(std::integral_constant<int, 5>{}, i); break;
      case 4: d = rows_of(std::integral_constant<int, 4>{}, i); break;
      case 3: d = rows_of(std::integral_constant<int, 3>{}, i); break;
      case 2: d = rows_of(std::integral_constant<int, 2>{}, i); break;
      default: d = rows_of(std::integral_constant<int, 1>{}, i); break;
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

template <typename T, int NV, bool DELTA>
TORCHITER_INLINE ColumnDeltas<T, NV> column_step(
    const ChannelMixing<T>& pn, const T* y, const T* b, T* yn, int64_t ld, int64_t s,
    const Vectorized<T>& neg_lr, int64_t valid) {
  if (pn.diagonal) {
    return diagonal_step<T, NV, DELTA>(pn, y, b, yn, ld, s, neg_lr, valid);
  }
  return over_row_blocks<T, NV, DELTA>(pn, [&](auto R, int64_t i) {
    return rows_step<T, decltype(R)::value, NV, DELTA>(pn, i, y, b, yn, ld, s, neg_lr, valid);
  });
}

// The column steps of a block [0, n) (n a multiple of the width): full steps
// of NVMax vectors, then of 2 and of 1 for a tile's last, narrower columns.
// Calls col(std::integral_constant<int, NV>{}, s) for the step at column s
// and, with DELTA, sink(s, deltas).
template <typename T, int NVMax, bool DELTA, typename Col, typename Sink>
inline void for_column_steps(int64_t n, Col&& col, Sink&& sink) {
  constexpr int64_t W = Vectorized<T>::size();
  const auto run = [&](auto nv, int64_t& s) {
    constexpr int NV = decltype(nv)::value;
    for (; s + NV * W <= n; s += NV * W) {
      const auto d = col(nv, s);
      if constexpr (DELTA) {
        sink(s, d);
      }
    }
  };
  int64_t s = 0;
  run(std::integral_constant<int, NVMax>{}, s);
  if constexpr (NVMax > 2) {
    run(std::integral_constant<int, 2>{}, s);
  }
  if constexpr (NVMax > 1) {
    run(std::integral_constant<int, 1>{}, s);
  }
}

// ---- Channel mixing on bfloat16 dot products (AVX512-BF16) -----------------
// For a bfloat16 model (whose A is exactly a bfloat16 matrix), or a float32
// one while PyTorch's float32 matmul precision allows bfloat16 (the CPU entry
// points decide: QuadraticDescentArgs::bf16_mixing), the mixing may take its
// inputs at bfloat16 width: A is rounded once, each iteration rounds y to
// bfloat16 for the product only, and VDPBF16PS multiplies
// pairs of channels into float32 accumulators, twice the FLOPs of an FMA per
// instruction. The update, projection, stop test and the state itself stay
// in float32. Only the AVX-512 variant has this path, and only on CPUs with
// AVX512-BF16 (checked at run time); the functions carry that target
// themselves, so the variant still runs on AVX-512 CPUs without it. Every
// position sees the same operations at any thread count, so results stay
// bitwise thread-invariant; they differ from the float32 mixing by bfloat16
// rounding of y's inputs to the product.
#if defined(CPU_CAPABILITY_AVX512) && (defined(__GNUC__) || defined(__clang__))
#define TORCHITER_BF16_MIXING 1
#define TORCHITER_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// Below this many channels the per-iteration packing of y costs more than
// the faster products save.
constexpr int64_t kBf16MinChannels = 32;

// Asked once per process: the answer cannot change, and the ops call this
// on every loop that may use the bfloat16 path.
inline bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
}

// x rounded to bfloat16 (nearest even; NaN stays NaN), as its 16 bits: what
// converting to torch.bfloat16 gives. Written out here rather than taken from
// c10::BFloat16 so that no inline function shared with the host code is
// compiled with this variant's flags.
inline uint32_t bf16_bits(float x) {
  if (std::isnan(x)) {
    return 0x7FC0u;
  }
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// The (C, C) row-major A rounded to bfloat16 in pairs of channels: row i's
// channels (2p, 2p + 1) as word p of row i, the even one in the low half.
// Rows of `row_words` >= ceil(C / 2) words, `rows` >= C of them; every word
// past the data (an odd C's last half, padding) is zero.
inline std::vector<uint32_t> bf16_pair_rows(const float* a, int64_t C, int64_t row_words, int64_t rows) {
  std::vector<uint32_t> out(static_cast<size_t>(rows * row_words), 0u);
  for (int64_t i = 0; i < C; ++i) {
    const float* row = a + i * C;
    for (int64_t p = 0; 2 * p < C; ++p) {
      const uint32_t lo = bf16_bits(row[2 * p]);
      const uint32_t hi = 2 * p + 1 < C ? bf16_bits(row[2 * p + 1]) : 0;
      out[static_cast<size_t>(i * row_words + p)] = lo | (hi << 16);
    }
  }
  return out;
}

// Rows (2p, 2p + 1) of y's C x n block (row stride ld, n a multiple of 16)
// into yp[p * out_ld + s]: position s's two values rounded to bfloat16
// (nearest even), the even row in the low half of the word.
TORCHITER_BF16_TARGET
inline void pack_pairs(const float* y, int64_t ld, int64_t C, int64_t n, uint32_t* yp, int64_t out_ld) {
  // Word 2l of the result takes word l of the low row, word 2l + 1 word l of
  // the high row (the low row fills words 0-15 after the conversion).
  alignas(64) static constexpr int16_t kInterleave[32] = {
      0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t p = 0; 2 * p < C; ++p) {
    const float* lo = y + 2 * p * ld;
    const float* hi = 2 * p + 1 < C ? lo + ld : nullptr;
    uint32_t* out = yp + p * out_ld;
    for (int64_t s = 0; s < n; s += 16) {
      const __m512 h = hi ? _mm512_loadu_ps(hi + s) : zero;
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(h, _mm512_loadu_ps(lo + s));
      _mm512_storeu_si512(out + s, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

// rows_step on bfloat16 pairs: rows [i, i + R) of the NV * 16 positions at
// column s, yp the packed block (pack_pairs, row length n).
template <int R, int NV, bool DELTA>
TORCHITER_BF16_TARGET inline ColumnDeltas<float, NV> rows_step_bf16(
    const ChannelMixing<float>& pn, int64_t i, const uint32_t* yp, int64_t n, const float* y,
    const float* b, float* yn, int64_t ld, int64_t s, const Vectorized<float>& neg_lr, int64_t valid) {
  constexpr int64_t W = 16;
  const int64_t P = pn.pairs;
  __m512 acc[R][NV];
  TORCHITER_UNROLL
  for (int r = 0; r < R; ++r) {
    TORCHITER_UNROLL
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = _mm512_setzero_ps();
    }
  }
  const uint32_t* Ai = pn.A_pairs + i * P;
  for (int64_t p = 0; p < P; ++p) {
    __m512bh yv[NV];
    TORCHITER_UNROLL
    for (int v = 0; v < NV; ++v) {
      yv[v] = (__m512bh)_mm512_loadu_si512(yp + p * n + s + v * W);
    }
    TORCHITER_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(Ai[r * P + p]));
      TORCHITER_UNROLL
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, yv[v]);
      }
    }
  }
  Vectorized<float> mixed[R][NV];
  TORCHITER_UNROLL
  for (int r = 0; r < R; ++r) {
    TORCHITER_UNROLL
    for (int v = 0; v < NV; ++v) {
      mixed[r][v] = Vectorized<float>(acc[r][v]);
    }
  }
  return finish_rows<float, R, NV, DELTA>(pn, mixed, i, y, b, yn, ld, s, neg_lr, valid);
}

// column_step on bfloat16 pairs.
template <int NV, bool DELTA>
TORCHITER_BF16_TARGET ColumnDeltas<float, NV> column_step_bf16(
    const ChannelMixing<float>& pn, const uint32_t* yp, int64_t n, const float* y, const float* b,
    float* yn, int64_t ld, int64_t s, const Vectorized<float>& neg_lr, int64_t valid) {
  return over_row_blocks<float, NV, DELTA>(pn, [&](auto R, int64_t i) {
    return rows_step_bf16<decltype(R)::value, NV, DELTA>(pn, i, yp, n, y, b, yn, ld, s, neg_lr, valid);
  });
}

// step_columns on bfloat16 pairs: packs the block once, then the same
// column steps (4, 2, then 1 vector wide).
template <bool DELTA, typename Sink>
void step_columns_bf16(
    const ChannelMixing<float>& pn, const float* y, const float* b, float* yn, int64_t ld, int64_t n,
    int64_t valid, float lr, Sink&& sink) {
  // One buffer per thread, grown to the widest block seen: a tile's packed
  // copy is C / 2 x width words, allocated once rather than per iteration.
  thread_local std::vector<uint32_t> packed;
  const size_t need = static_cast<size_t>(pn.pairs * n);
  if (packed.size() < need) {
    packed.resize(need);
  }
  pack_pairs(y, ld, pn.C, n, packed.data(), n);
  const uint32_t* yp = packed.data();
  const Vectorized<float> neg_lr(-lr);
  for_column_steps<float, 4, DELTA>(n, [&](auto nv, int64_t s) {
    return column_step_bf16<decltype(nv)::value, DELTA>(pn, yp, n, y, b, yn, ld, s, neg_lr, valid - s);
  }, sink);
}
#endif

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

} // namespace
} // namespace torchiter::cpu::CPU_CAPABILITY
