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
