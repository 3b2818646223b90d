// One iteration of a block of positions: the column steps of steps.h, with
// the channel mixing each loop asked for (float32 FMA chains, bfloat16 dot
// products, or AMX tiles, amx.h). Every loop driver steps its tiles through
// here.
//
// Part of the CPU quadratic_descent kernel: included by layout.h, and so
// compiled once per instruction-set variant (see kernels.h).
#pragma once

#include "amx.h"
#include "steps.h"

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

// One iteration over columns [0, n) of a block (n a multiple of the width;
// lanes at or past `valid` are padding, excluded from the delta). Every lane
// sees the same sequence of operations whichever block it falls in, so the
// blocking does not change results. With DELTA, each column step's deltas go
// to `sink(s, deltas)`, s the column of its first vector.
template <typename T, bool DELTA, typename Sink>
inline void step_columns(
    const ChannelMixing<T>& pn, const T* y, const T* b, T* yn, int64_t ld, int64_t n,
    int64_t valid, T lr, Sink&& sink) {
#ifdef TORCHITER_BF16_MIXING
  if constexpr (std::is_same_v<T, float>) {
#ifdef TORCHITER_AMX_MIXING
    if (pn.A_tiles) {
      pn.amx_emulated ? step_columns_amx<AmxEmulated, DELTA>(pn, y, b, yn, ld, n, valid, lr, sink)
                      : step_columns_amx<AmxHardware, DELTA>(pn, y, b, yn, ld, n, valid, lr, sink);
      return;
    }
#endif
    if (pn.A_pairs) {
      step_columns_bf16<DELTA>(pn, y, b, yn, ld, n, valid, lr, sink);
      return;
    }
  }
#endif
  const Vectorized<T> neg_lr(-lr);
  for_column_steps<T, kColumnVectors<T>, DELTA>(n, [&](auto nv, int64_t s) {
    return column_step<T, decltype(nv)::value, DELTA>(pn, y, b, yn, ld, s, neg_lr, valid - s);
  }, sink);
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

// True when the mixing of a y that is +0 everywhere gives +-0 in every lane,
// whichever way it is summed: every A_ij finite, also as rounded to bfloat16
// for the bfloat16 and AMX mixing (a float past bfloat16's largest rounds to
// infinity), since infinity * 0 is NaN.
template <typename T>
bool mixes_zero_to_zero(const ChannelMixing<T>& mix) {
  for (int64_t i = 0; i < mix.C * mix.C; ++i) {
    if (!std::isfinite(mix.A[i])) {
      return false;
    }
  }
  const auto finite_halves = [](const uint32_t* words, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      if ((words[i] & 0x7F80u) == 0x7F80u || (words[i] & 0x7F800000u) == 0x7F800000u) {
        return false;
      }
    }
    return true;
  };
  if (mix.A_pairs != nullptr && !finite_halves(mix.A_pairs, mix.C * mix.pairs)) {
    return false;
  }
#ifdef TORCHITER_AMX_MIXING
  if (mix.A_tiles != nullptr && !finite_halves(mix.A_tiles, round_up(mix.C, kAmxBlock) * mix.tile_pairs)) {
    return false;
  }
#endif
  return true;
}

// True when every element of columns [0, count) of a C-row block (row
// stride ld) is +0, bit for bit.
template <typename T>
bool all_positive_zero(const T* y, int64_t C, int64_t ld, int64_t count) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  Bits any = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T* row = y + c * ld;
    for (int64_t p = 0; p < count; ++p) {
      Bits u;
      std::memcpy(&u, row + p, sizeof u);
      any |= u;
    }
  }
  return any == 0;
}

// step_block for a block whose y is +0 in every lane, where
// mixes_zero_to_zero(pn) holds: A y is then +-0, and next_value gives the same
// bits for either sign (y - lr (+-0 - b) from y = +0: -b when b is not zero,
// else a zero that adding y = +0 makes +0), so the step needs no mixing: one
// update per element instead of C FMAs. The first iteration of a loop from
// zeros, as every model starts its state.
template <typename T, bool DELTA>
inline Vectorized<T> zero_start_block(
    const ChannelMixing<T>& pn, const T* y, const T* b, T* yn, int64_t ld, int64_t n,
    int64_t valid, T lr) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const VecProjection<T> project = *pn.project;
  const Vec neg_lr(-lr);
  const Vec zero(static_cast<T>(0));
  const auto run = [&](auto shrink) {
    Vec dmax(static_cast<T>(0));
    for (int64_t c = 0; c < pn.C; ++c) {
      for (int64_t s = 0; s < n; s += W) {
        update_vector<decltype(shrink)::value, DELTA>(project, zero, y, b, yn, c * ld + s, neg_lr, valid - s, dmax);
      }
    }
    return dmax;
  };
  return project.use_shrink ? run(std::true_type{}) : run(std::false_type{});
}

// zero_start_block's update for one position from y = +0: its C channels
// of b in b[0, C), their new values to yn[0, C). Returns max |new - old| over
// them (NaN if any is).
template <typename T>
inline T zero_start_position(const VecProjection<T>& project, const T* b, T* yn, int64_t C, T lr) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec neg_lr(-lr);
  const Vec zero(static_cast<T>(0));
  Vec dmax(static_cast<T>(0));
  for (int64_t c = 0; c < C; c += W) {
    const int64_t lanes = std::min<int64_t>(W, C - c);
    const Vec bv = lanes == W ? Vec::loadu(b + c) : Vec::loadu(b + c, lanes);
    const Vec nv = project.use_shrink ? next_value<true>(project, zero, bv, zero, neg_lr)
                                      : next_value<false>(project, zero, bv, zero, neg_lr);
    lanes == W ? nv.store(yn + c) : nv.store(yn + c, lanes);
    dmax = max_change(dmax, masked_delta(nv, zero, lanes));
  }
  return lane_max(dmax);
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

} // namespace
} // namespace torchiter::cpu::CPU_CAPABILITY
