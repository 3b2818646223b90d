// Loop drivers of the quadratic_descent kernel for a batch that stops as a
// whole: run_blocked (no stop test: each tile runs all iterations while it
// sits in L1), run_diagonal (a diagonal A: one FMA per element), run_sweeps
// (a stop test or a trace: one parallel sweep over y per iteration, after a
// BLAS GEMM from kGemmMinChannels channels on in the plain x86-64 variant), and what they measure for
// quadratic_descent_ex (LoopStats).
//
// Part of the CPU quadratic_descent kernel: included by quadratic_descent.cpp
// alone, once per instruction-set variant (see kernels.h), so its internal
// linkage gives every variant its own copy.
#pragma once

#include "layout.h"
#include "../../../interrupt.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <type_traits>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

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

  // Folds in the first and the last change of a loop over part of the
  // positions of entry 0 (a driver run on a subset of a batch).
  void measured_part(T first_change, T last_change, int64_t K) {
    first[0] = nan_max(first[0], first_change);
    last[0] = nan_max(last[0], last_change);
    iterations[0] = K;
  }

  // Records the change of iteration k for entry i.
  void measured(size_t i, int64_t k, T change) {
    if (k == 0) {
      first[i] = change;
    }
    last[i] = change;
  }
};

// Where run_blocked reads y0 and b and writes the result: element (channel
// c, position p) of group g at g * group_stride + c * row_stride +
// p * position_stride. Either the working copies (row_stride =
// padded_positions), or the (batch, C, spatial) tensors themselves: per
// sample (row_stride = spatial), or, for a batch without spatial dims, the
// (B, C) rows (row_stride 1, position_stride C). The tile copies do the
// packing (a transpose in the last case), so no working copy is made and
// the packing is spread over the threads with the tiles.
template <typename T>
struct BlockedIO {
  const T* y;
  const T* b;
  T* out;
  int64_t row_stride, group_stride;
  int64_t position_stride = 1;
};

// True when a position whose y0 is +0 and whose b is zero in every channel
// keeps y = +0 through all iterations of the dense loop, bit for bit: its
// mixed value is a sum of A_ij * (+0) from +0, which is +0 when every A_ij
// is finite; +0 - b is then +0, fma(+0, -lr, +0) is +0 for the finite rates
// the op accepts, and the projection must map +0 to +0 (ReLU, a clamp at 0,
// soft thresholding; not a clamp to [0.1, 1]).
template <typename T>
bool rest_stays_at_zero(const ChannelMixing<T>& mix) {
  using Vec = Vectorized<T>;
  // Also A as the bfloat16 mixing rounds it: a float past bfloat16's range
  // is infinite there, and infinity * 0 is NaN.
  if (!mixes_zero_to_zero(mix)) {
    return false;
  }
  T out[Vec::size()];
  (*mix.project)(Vec(static_cast<T>(0))).store(out);
  return std::all_of(std::begin(out), std::end(out), [](T v) { return v == T(0) && !std::signbit(v); });
}

// Every rate of a schedule's K iterations, read up front (empty without a
// schedule): for drivers in which every tile or row needs every rate.
template <typename T>
std::vector<T> scheduled_rates(LearningRates& lrs, int64_t K) {
  std::vector<T> rates(lrs.scheduled() ? static_cast<size_t>(K) : 0);
  for (size_t k = 0; k < rates.size(); ++k) {
    rates[k] = static_cast<T>(lrs.at(static_cast<int64_t>(k)));
  }
  return rates;
}

// Runs task(grab) once per parallel task (on the calling thread alone where
// one grab covers every tile); grab(t0, t1) hands the task tiles [t0, t1),
// `per_grab` at a time from a shared counter, and is false once none are
// left. Against a fixed share per thread, a core slowed by other work (another
// process, a neighbouring VM) then does fewer tiles rather than holding the
// others back at the end. Which tiles a task gets must never change what a
// position computes, so that results stay bitwise the same.
template <typename Task>
void for_tiles(int64_t count, int64_t per_grab, Task&& task) {
  const int64_t grabs = (count + per_grab - 1) / per_grab;
  std::atomic<int64_t> next{0};
  const auto worker = [&](int64_t, int64_t) {
    task([&](int64_t& t0, int64_t& t1) {
      t0 = next.fetch_add(per_grab, std::memory_order_relaxed);
      t1 = std::min(count, t0 + per_grab);
      return t0 < count;
    });
  };
  if (grabs > 1) {
    at::parallel_for(0, grabs, 1, worker);
  } else {
    worker(0, grabs);
  }
}

// Copies `rows` rows of n elements, rows `from_ld` apart in `from` and
// `to_ld` apart in `to`: a tile into its L1 block and back.
template <typename T>
void copy_rows(const T* from, int64_t from_ld, T* to, int64_t to_ld, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(from + r * from_ld, n, to + r * to_ld);
  }
}

// No stop test: each tile is copied into three tile-local C x width blocks
// (allocated once per task, never per iteration; lanes past the real
// positions zero-filled) and runs all K iterations there before its result
// is written out. With `stats` the first and the last iteration also
// measure their change.
//
// Positions at rest (y0 = +0 and b = 0 in every channel: the background of
// an image under a bias-free encoder, a third of MNIST's conv positions)
// stay at +0 where rest_stays_at_zero holds: they are written as +0 without
// being iterated, and each thread packs the positions that do move from
// consecutive tiles into full tiles of its own. Which lane or tile a position
// runs in never changes its arithmetic, so results are bitwise those of the
// dense loop at any thread count.
template <typename T>
void run_blocked(
    const BlockedIO<T>& io, const ChannelMixing<T>& mix,
    const Tiles& tiles, int64_t K, LearningRates& lrs, LoopStats<T>* stats,
    InterruptPoll& poll) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  constexpr int64_t W = Vectorized<T>::size();
  const int64_t C = mix.C;
  // All K iterations run and every tile needs every rate: a schedule's are
  // read once, up front.
  const T lr = static_cast<T>(lrs.at(0));
  const std::vector<T> scheduled = scheduled_rates<T>(lrs, K);
  const bool skip_rest = rest_stays_at_zero(mix);
  // (skip_rest already found the mixing of +0 to be +-0.)
  const bool zero_first = K > 0 && (skip_rest || mixes_zero_to_zero(mix));
  const int64_t T_w = tiles.width;
  const int64_t ld = io.row_stride;
  const int64_t ps = io.position_stride;
  T first_max = 0, last_max = 0;
  std::mutex stats_mutex;
  const int64_t per_grab = std::max<int64_t>(1, tiles.grain / std::max<int64_t>(K, 1));
  for_tiles(tiles.count, per_grab, [&](auto&& grab) {
    // Tiles configured once for all of this thread's steps (amx.h).
    const AmxSession amx_session(mix);
    std::vector<T> local(static_cast<size_t>(3 * C * T_w));
    T* cur = local.data();
    T* nxt = cur + C * T_w;
    T* bl = nxt + C * T_w;
    // The moving positions gathered so far (columns [0, staged) of cur and
    // bl) and where each one's C values go: the offset of channel 0 in io.
    std::vector<int64_t> slot(static_cast<size_t>(T_w));
    std::vector<Bits> moving(static_cast<size_t>(T_w));
    int64_t staged = 0;
    T my_first = 0, my_last = 0;
    bool measured = false;
    // Runs all K iterations on the first `count` columns of cur / bl;
    // returns the block holding the result, or nullptr when interrupted.
    const auto iterate = [&](int64_t count) -> const T* {
      const int64_t n = (count + W - 1) / W * W;
      for (int64_t c = 0; c < C; ++c) {
        std::fill(cur + c * T_w + count, cur + c * T_w + n, T(0));
        std::fill(bl + c * T_w + count, bl + c * T_w + n, T(0));
      }
      T* src = cur;
      T* dst = nxt;
      // A tile that starts at +0 (every model's state does) takes its first
      // iteration without the mixing (zero_start_block).
      const bool from_zero = zero_first && all_positive_zero(cur, C, T_w, count);
      for (int64_t k = 0; k < K; ++k) {
        // A tile of a wide layer can take seconds over all K iterations.
        if ((k & 15) == 15 && poll.stop()) {
          return nullptr;
        }
        const T lr_k = scheduled.empty() ? lr : scheduled[static_cast<size_t>(k)];
        if (k == 0 && from_zero) {
          const T m = lane_max(zero_start_block<T, true>(mix, src, bl, dst, T_w, n, count, lr_k));
          if (stats) {
            my_first = nan_max(my_first, m);
            if (K == 1) {
              my_last = nan_max(my_last, m);
            }
            measured = true;
          }
        } else if (stats && (k == 0 || k == K - 1)) {
          const T m = lane_max(step_block<T, true>(mix, src, bl, dst, T_w, n, count, lr_k));
          if (k == 0) {
            my_first = nan_max(my_first, m);
          }
          if (k == K - 1) {
            my_last = nan_max(my_last, m);
          }
          measured = true;
        } else {
          step_block<T, false>(mix, src, bl, dst, T_w, n, count, lr_k);
        }
        std::swap(src, dst);
      }
      return src;
    };
    const auto run_staged = [&]() {
      if (const T* src = iterate(staged)) {
        for (int64_t p = 0; p < staged; ++p) {
          T* op = io.out + slot[static_cast<size_t>(p)];
          for (int64_t c = 0; c < C; ++c) {
            op[c * ld] = src[c * T_w + p];
          }
        }
      }
      staged = 0;
    };
    const auto run_tile = [&](int64_t t) {
      int64_t unused, n, valid;
      tiles.bounds(t, unused, n, valid);
      const int64_t off = t / tiles.per_group * io.group_stride + t % tiles.per_group * T_w * ps;
      int64_t resting = 0;
      if (skip_rest) {
        // Channel by channel, so that the (C, positions) layout reads rows.
        std::fill_n(moving.begin(), valid, Bits(0));
        for (int64_t c = 0; c < C; ++c) {
          const T* yc = io.y + off + c * ld;
          const T* bc = io.b + off + c * ld;
          for (int64_t p = 0; p < valid; ++p) {
            moving[static_cast<size_t>(p)] |= motion_bits(yc + p * ps, bc + p * ps);
          }
        }
        for (int64_t p = 0; p < valid; ++p) {
          resting += moving[static_cast<size_t>(p)] == 0;
        }
      }
      if (resting == 0 && staged == 0) {
        if (ps == 1) {
          copy_rows(io.y + off, ld, cur, T_w, C, valid);
          copy_rows(io.b + off, ld, bl, T_w, C, valid);
        } else {
          // One position's C values are contiguous: read them in order.
          for (int64_t p = 0; p < valid; ++p) {
            const T* yp = io.y + off + p * ps;
            const T* bp = io.b + off + p * ps;
            for (int64_t c = 0; c < C; ++c) {
              cur[c * T_w + p] = yp[c * ld];
              bl[c * T_w + p] = bp[c * ld];
            }
          }
        }
        const T* src = iterate(valid);
        if (src == nullptr) {
          return;
        }
        if (ps == 1) {
          copy_rows(src, T_w, io.out + off, ld, C, valid);
        } else {
          for (int64_t p = 0; p < valid; ++p) {
            T* op = io.out + off + p * ps;
            for (int64_t c = 0; c < C; ++c) {
              op[c * ld] = src[c * T_w + p];
            }
          }
        }
        return;
      }
      for (int64_t p = 0; p < valid; ++p) {
        const int64_t base = off + p * ps;
        if (moving[static_cast<size_t>(p)] == 0) {
          for (int64_t c = 0; c < C; ++c) {
            io.out[base + c * ld] = T(0);
          }
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {
          cur[c * T_w + staged] = io.y[base + c * ld];
          bl[c * T_w + staged] = io.b[base + c * ld];
        }
        slot[static_cast<size_t>(staged++)] = base;
        if (staged == T_w) {
          run_staged();
        }
      }
    };
    for (int64_t t0, t1; grab(t0, t1);) {
      if (poll.stop()) {
        return;
      }
      for (int64_t t = t0; t < t1; ++t) {
        run_tile(t);
      }
    }
    if (staged > 0 && !poll.stop()) {
      run_staged();
    }
    if (measured) {
      const std::lock_guard<std::mutex> lock(stats_mutex);
      first_max = nan_max(first_max, my_first);
      last_max = nan_max(last_max, my_last);
    }
  });
  if (stats) {
    stats->measured_part(first_max, last_max, K);
  }
}

// Per lane of [0, n) of two C-row blocks (row stride ld): zero where every
// channel has the same bits in a and b. One XOR and one OR per element, in
// integer vectors: a float compare would equate -0 with +0.
template <typename T, typename Bits>
void changed_lanes(const T* a, const T* b, int64_t C, int64_t ld, int64_t n, Bits* out) {
  using IV = Vectorized<std::conditional_t<sizeof(T) == 8, int64_t, int32_t>>;
  static_assert(IV::size() == Vectorized<T>::size() && sizeof(Bits) == sizeof(T));
  for (int64_t s = 0; s < n; s += IV::size()) {
    IV acc(0);
    for (int64_t c = 0; c < C; ++c) {
      const auto* ra = reinterpret_cast<const typename IV::value_type*>(a + c * ld + s);
      const auto* rb = reinterpret_cast<const typename IV::value_type*>(b + c * ld + s);
      acc = acc | (IV::loadu(ra) ^ IV::loadu(rb));
      // Once every lane has a changed channel the rest cannot matter: in a
      // loop still on its way, that is within the first few channels. (Read
      // as floats, a lane whose only difference is a sign bit looks zero
      // and merely keeps the scan going.)
      if ((c & 3) == 3 && at::vec::cast<T>(acc).zero_mask() == 0) {
        break;
      }
    }
    acc.store(reinterpret_cast<typename IV::value_type*>(out + s));
  }
}

// A thread's tile for the drivers in which every lane runs its own item at
// its own iteration count (run_lanes: positions; run_per_sample_rows:
// samples): C x width blocks of y, its next value and b, each lane's change
// in the last measured step, and per lane its item and the step at which it
// entered. A lane that stops takes the thread's next item at once; once
// there are none, the last running lane moves into it instead, so the tile
// only narrows and no lane idles. An item's arithmetic is the same in every
// lane, so where it runs never changes its result.
template <typename T>
struct LaneTile {
  int64_t C, width, K;
  std::vector<T> buffer;
  T *cur, *nxt, *bl, *pmax;
  std::vector<int64_t> item, entered;
  std::vector<uint8_t> done;
  std::vector<int64_t> finished; // lanes stopped since the last step, increasing
  std::vector<int64_t> fresh;    // lanes entered since the last step
  int64_t count = 0, steps = 0;
  // The earliest step at which a running lane has run K iterations.
  int64_t deadline = std::numeric_limits<int64_t>::max();
  // Lanes from here on hold no stopped item's values (see padded).
  int64_t clean_from = width;

  LaneTile(int64_t C_, int64_t width_, int64_t K_)
      : C(C_), width(width_), K(K_), buffer(static_cast<size_t>(3 * C_ * width_ + width_)),
        item(static_cast<size_t>(width_)), entered(static_cast<size_t>(width_)),
        done(static_cast<size_t>(width_), 0) {
    cur = buffer.data();
    nxt = cur + C * width;
    bl = nxt + C * width;
    pmax = bl + C * width;
    finished.reserve(static_cast<size_t>(width));
    fresh.reserve(static_cast<size_t>(width));
  }
  // Lane p, its y and b written, starts item `it` now, `ran` (0 or 1 < K) of
  // its iterations already run. Lanes that start at iteration 0 are `fresh`:
  // their first step is the item's first iteration.
  void enter(int64_t p, int64_t it, int64_t ran = 0) {
    item[static_cast<size_t>(p)] = it;
    entered[static_cast<size_t>(p)] = steps - ran;
    done[static_cast<size_t>(p)] = 0;
    if (ran == 0) {
      fresh.push_back(p);
    }
    deadline = std::min(deadline, steps - ran + K);
  }
  int64_t ran(int64_t p) const {
    return steps - entered[static_cast<size_t>(p)];
  }
  // Lane p, its result written out, stops.
  void stop(int64_t p) {
    done[static_cast<size_t>(p)] = 1;
    finished.push_back(p);
  }
  // Lanes from the thread's items until the tile is full: load(p) puts the
  // next one into lane p (and enters it), false once none is left.
  template <typename Load>
  void fill(Load&& load) {
    while (count < width && load(count)) {
      ++count;
    }
  }
  // Before each step: false once no lane runs or the loop is interrupted
  // (polled every 16 steps), else n = the width to step (see padded).
  bool next_step(InterruptPoll& poll, int64_t& n) {
    if (count == 0 || ((steps & 15) == 15 && poll.stop())) {
      return false;
    }
    n = padded();
    return true;
  }
  // The width to step, the running lanes rounded up to the vector width.
  // The lanes past them are computed with the tile and never read: zeroed
  // once, as the tile narrows past them, they stay finite.
  int64_t padded() {
    constexpr int64_t W = Vectorized<T>::size();
    const int64_t n = (count + W - 1) / W * W;
    if (count < clean_from) {
      for (int64_t c = 0; c < C; ++c) {
        std::fill(cur + c * width + count, cur + c * width + std::min(n, clean_from), T(0));
        std::fill(bl + c * width + count, bl + c * width + std::min(n, clean_from), T(0));
      }
      clean_from = count;
    }
    return n;
  }
  void stepped() {
    std::swap(cur, nxt);
    ++steps;
  }
  // At the deadline: stop_lane(p, ran_all) for every running lane not yet
  // stopped in this step (ran_all: it has run K iterations) says whether it
  // stopped (written out, stop called); the others set the next deadline.
  // Call it after any other scan of this step that stops lanes: its stops
  // are merged into theirs, so `finished` stays in increasing order for
  // refill.
  template <typename Stop>
  void at_deadline(Stop&& stop_lane) {
    if (steps != deadline) {
      return;
    }
    const auto before = static_cast<std::ptrdiff_t>(finished.size());
    // In a local: the member, written through `this` in the loop, would be
    // stored and reloaded for every lane.
    int64_t next = std::numeric_limits<int64_t>::max();
    for (int64_t p = 0; p < count; ++p) {
      if (done[static_cast<size_t>(p)]) {
        continue;
      }
      if (!stop_lane(p, ran(p) == K)) {
        next = std::min(next, entered[static_cast<size_t>(p)] + K);
      }
    }
    deadline = next;
    std::inplace_merge(finished.begin(), finished.begin() + before, finished.end());
  }
  // Each stopped lane (in increasing order) takes the thread's next item;
  // once none is left the last running lane moves into it. Only the stopped
  // lanes are visited: a scan of every lane per step would cost as much as
  // the step itself for a few channels.
  template <typename Load>
  void refill(Load&& load) {
    const auto trim = [&] {
      while (count > 0 && done[static_cast<size_t>(count - 1)]) {
        --count;
      }
    };
    for (const int64_t p : finished) {
      if (load(p)) {
        continue;
      }
      trim();
      if (p >= count) {
        break;
      }
      move(count - 1, p);
      --count;
    }
    trim();
    finished.clear();
  }

 private:
  void move(int64_t from, int64_t to) {
    for (int64_t c = 0; c < C; ++c) {
      cur[c * width + to] = cur[c * width + from];
      bl[c * width + to] = bl[c * width + from];
    }
    item[static_cast<size_t>(to)] = item[static_cast<size_t>(from)];
    entered[static_cast<size_t>(to)] = entered[static_cast<size_t>(from)];
    done[static_cast<size_t>(to)] = 0;
  }
};

#ifndef TORCHITER_CHECK_CHANNELS
#define TORCHITER_CHECK_CHANNELS 128
#endif
constexpr int64_t kCheckChannels = TORCHITER_CHECK_CHANNELS;

// No stop test and one rate for every iteration, where positions reach a
// fixed point of the loop's own arithmetic: an iteration that leaves every
// channel of a position bit for bit unchanged (a change of exactly 0, values
// finite, zeros keeping their sign) is the same function of the same bits as
// the next one, so every later iteration leaves it unchanged too. A
// contracting loop gets there long before max_iterations in float32 (the
// MNIST conv layer: 99.9% of its positions by iteration 26 of 40), and
// positions at rest (see rest_stays_at_zero) are there from the start.
//
// Each thread keeps a tile of running positions in L1, each lane at its own
// iteration count; a lane whose position is fixed, or has run K iterations,
// is written out and takes the thread's next position at once (as
// run_per_sample_rows does with samples), and once the positions are used up
// the tile narrows. Every position runs the arithmetic of the dense loop in
// whichever lane it sits, and stops only where that loop would no longer
// change it, so results are those of run_blocked, bit for bit, at any thread
// count. Runs positions [begin, end), numbered group by group (`positions`
// per group): position p of group g starts at g * io.group_stride +
// p * io.position_stride. With `stats`, each position's first iteration and
// its K-th (a fixed one changes by 0) are measured and folded in. Returns the
// share of the moving positions' K iterations each that they were spared.
template <typename T>
double run_lanes(
    const BlockedIO<T>& io, const ChannelMixing<T>& mix, int64_t positions, int64_t begin,
    int64_t end, int64_t K, T lr, LoopStats<T>* stats, InterruptPoll& poll) {
  using Vec = Vectorized<T>;
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  constexpr int64_t W = Vec::size();
  const int64_t C = mix.C;
  const int64_t ld = io.row_stride;
  const int64_t T_w = tile_width<T>(C);
  const bool skip_rest = rest_stays_at_zero(mix);
  // A position that starts at +0 enters with its first iteration done
  // without the mixing (zero_start_position).
  const bool zero_first = K > 1 && (skip_rest || mixes_zero_to_zero(mix));
  // Positions are handed out a few vectors' worth at a time: neighbours
  // share cache lines of the (C, positions) rows, and the shared counter is
  // rarely touched.
  constexpr int64_t kChunk = 4 * W;
  std::atomic<int64_t> next_position{begin};
  // Iterations the positions that move ran, and those they were spared.
  std::atomic<int64_t> ran_total{0}, spared_total{0};
  // As run_blocked: ~64k FMAs of work per task, small problems on the
  // calling thread.
  // (In double: positions x C^2 x K can pass 2^63 for a huge batch.)
  const int64_t count = std::max<int64_t>(end - begin, 0);
  const double fmas = static_cast<double>(count) * static_cast<double>(C * C) * static_cast<double>(K);
  const int64_t tasks = std::clamp<int64_t>(
      static_cast<int64_t>(std::min(fmas / 65536.0, static_cast<double>((count + W - 1) / W))), 1,
      at::get_num_threads());
  // Looking for fixed lanes reads the tile once more (less where every lane
  // soon shows a change), against C FMAs per element for a step: with few
  // channels it is done every few steps only (a fixed position then runs a
  // few more iterations that change nothing).
  const int64_t check_period = std::clamp<int64_t>(kCheckChannels / std::max<int64_t>(C, 1), 1, 8);
  T first_max = 0, last_max = 0;
  std::mutex stats_mutex;
  const auto worker = [&](int64_t, int64_t) {
    // Tiles configured once for all of this thread's steps (amx.h).
    const AmxSession amx_session(mix);
    // A lane's item: the offset of its position's channel 0.
    LaneTile<T> tile(C, T_w, K);
    std::vector<Bits> changed(static_cast<size_t>(T_w + W));
    // One position's b and first iteration, contiguous.
    std::vector<T> column(static_cast<size_t>(2 * C));
    int64_t chunk_next = 0, chunk_end = 0, group = 0, within = 0;
    int64_t next_check = check_period;
    T my_first = 0, my_last = 0;
    int64_t my_ran = 0, my_spared = 0;
    const auto finish = [&](int64_t p) {
      T* to = io.out + tile.item[static_cast<size_t>(p)];
      for (int64_t c = 0; c < C; ++c) {
        to[c * ld] = tile.cur[c * T_w + p];
      }
      my_ran += tile.ran(p);
      my_spared += K - tile.ran(p);
      tile.stop(p);
    };
    // The thread's next moving position into lane p (positions at rest are
    // written as +0 on the way); false when none is left.
    const auto load_next = [&](int64_t p) {
      for (;;) {
        if (chunk_next == chunk_end) {
          chunk_next = std::min(end, next_position.fetch_add(kChunk, std::memory_order_relaxed));
          chunk_end = std::min(end, chunk_next + kChunk);
          if (chunk_next == chunk_end) {
            return false;
          }
          // One division per chunk: per position it costs as much as
          // loading a small one.
          group = chunk_next / positions;
          within = chunk_next % positions;
        }
        ++chunk_next;
        const int64_t at = group * io.group_stride + within * io.position_stride;
        if (++within == positions) {
          within = 0;
          ++group;
        }
        const T* yp = io.y + at;
        const T* bp = io.b + at;
        Bits moving = 0, y_bits = 0;
        for (int64_t c = 0; c < C; ++c) {
          tile.cur[c * T_w + p] = yp[c * ld];
          tile.bl[c * T_w + p] = bp[c * ld];
          moving |= motion_bits(yp + c * ld, bp + c * ld);
          Bits u;
          std::memcpy(&u, yp + c * ld, sizeof u);
          y_bits |= u;
        }
        if (skip_rest && moving == 0) {
          T* to = io.out + at;
          for (int64_t c = 0; c < C; ++c) {
            to[c * ld] = T(0);
          }
          continue;
        }
        if (zero_first && y_bits == 0) {
          T* bc = column.data();
          T* yc = bc + C;
          for (int64_t c = 0; c < C; ++c) {
            bc[c] = tile.bl[c * T_w + p];
          }
          const T change = zero_start_position(*mix.project, bc, yc, C, lr);
          for (int64_t c = 0; c < C; ++c) {
            tile.cur[c * T_w + p] = yc[c];
          }
          if (stats) {
            my_first = nan_max(my_first, change);
          }
          tile.enter(p, at, 1);
        } else {
          tile.enter(p, at);
        }
        return true;
      }
    };
    // max |new - old| over lane p's channels in the last step (NaN if any
    // is): what the measuring step gives it.
    const auto lane_change = [&](int64_t p) {
      T m = 0;
      for (int64_t c = 0; c < C; ++c) {
        m = nan_max(m, std::abs(tile.cur[c * T_w + p] - tile.nxt[c * T_w + p]));
      }
      return m;
    };
    // A lane left bit for bit unchanged is fixed only with finite values:
    // an infinity or a NaN changes by NaN in the dense loop, which its
    // statistics must see.
    const auto finite_lane = [&](int64_t p) {
      for (int64_t c = 0; c < C; ++c) {
        if (!std::isfinite(tile.cur[c * T_w + p])) {
          return false;
        }
      }
      return true;
    };
    tile.fill(load_next);
    for (int64_t n; tile.next_step(poll, n);) {
      step_block<T, false>(mix, tile.cur, tile.bl, tile.nxt, T_w, n, tile.count, lr);
      tile.stepped();
      // With stats, a lane's first and K-th iterations measure their change,
      // lane by lane: a measuring step over the whole tile would cost more
      // whenever some lane has just entered, which is most steps.
      if (stats) {
        for (const int64_t p : tile.fresh) {
          my_first = nan_max(my_first, lane_change(p));
        }
      }
      tile.fresh.clear();
      // A fixed lane that also reached its K-th iteration stops here: its
      // change, 0, cannot raise the measured maximum.
      if (tile.steps == next_check) {
        changed_lanes(tile.cur, tile.nxt, C, T_w, tile.count, changed.data());
        for (int64_t p = 0; p < tile.count; ++p) {
          if (changed[static_cast<size_t>(p)] == 0 && finite_lane(p)) {
            finish(p);
          }
        }
        next_check = tile.steps + check_period;
      }
      tile.at_deadline([&](int64_t p, bool ran_all) {
        if (ran_all) {
          if (stats) {
            my_last = nan_max(my_last, lane_change(p));
          }
          finish(p);
        }
        return ran_all;
      });
      tile.refill(load_next);
    }
    ran_total += my_ran;
    spared_total += my_spared;
    if (stats) {
      const std::lock_guard<std::mutex> lock(stats_mutex);
      first_max = nan_max(first_max, my_first);
      last_max = nan_max(last_max, my_last);
    }
  };
  if (tasks > 1) {
    at::parallel_for(0, tasks, 1, worker);
  } else {
    worker(0, 1);
  }
  if (stats) {
    stats->measured_part(first_max, last_max, K);
  }
  const int64_t all = ran_total.load() + spared_total.load();
  return all > 0 ? static_cast<double>(spared_total.load()) / static_cast<double>(all) : 0.0;
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
      // Tiles configured once for all of this thread's steps (amx.h).
      const AmxSession amx_session(mix);
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

// run_sweeps' loop (a stop test, no GEMM, no trace) with each tile kept in
// L1 for many iterations instead of one parallel sweep over y per iteration,
// which reads and writes all of y from L2 or memory every iteration and
// meets the other threads at a barrier every iteration (AVX2, 1 thread,
// 4096 rows: 1.24x at 64 channels, 1.0-1.1x at 10-32).
//
// The stop test needs every tile's change at the same iteration, so tiles
// run ahead only as far as the test cannot stop the loop. Each round starts
// with every tile at iteration `start`: in the run-ahead part each tile runs
// on its own until the first check where its own change is below tol (a
// candidate), or up to the window's end H. A tile that met no candidate
// before H proves that the loop does not stop before H (its change, part of
// the maximum, was at least tol at every check), and every tile then runs on
// to H. Otherwise the latest candidate F is the first check at which the
// loop can stop (the tile it came from was above tol at every earlier one);
// the others run on to F, and the maximum of all changes at F decides: stop
// after iteration F, or start the next round after it. Every position runs
// the same steps as in run_sweeps, the loop stops at the same check, and the
// statistics see the same changes, so results are bitwise run_sweeps'.
// Y holds the result; returns the iterations run.
template <typename T>
int64_t run_tiles_ahead(
    at::Tensor& Y, const at::Tensor& Bw, const ChannelMixing<T>& mix, const Tiles& tiles,
    const QuadraticDescentArgs& args, LearningRates& lrs, LoopStats<T>* stats,
    InterruptPoll& poll) {
  const int64_t C = mix.C;
  const int64_t ld = tiles.L->padded_positions;
  const int64_t K = args.max_iterations;
  const int64_t T_w = tiles.width;
  const T tol = static_cast<T>(args.tol);
  const size_t count = static_cast<size_t>(tiles.count);
  T* y = Y.data_ptr<T>();
  const T* b = Bw.const_data_ptr<T>();
  // Per tile: iterations applied to its part of Y, whether its run-ahead
  // stopped at a candidate, its change there or at the iteration asked for
  // (`measure_at` below), and its change at iteration 0 for the statistics.
  std::vector<int64_t> reached(count, 0);
  std::vector<uint8_t> candidate(count, 0);
  std::vector<T> change(count, 0), first(count, 0);
  const bool scheduled = lrs.scheduled();
  const T lr = static_cast<T>(lrs.at(0));
  std::vector<T> rates;
  int64_t rates_from = 0;
  std::atomic<bool> aborted{false};
  // Runs tile t from reached[t] up to iteration `until` (exclusive); with
  // `ahead`, stops after the first check whose change is below tol. Records
  // the change at iteration `measure_at` (and at 0 with statistics).
  const auto run_tile = [&](size_t t, int64_t until, bool ahead, int64_t measure_at, T* cur, T* nxt, T* bl) {
    int64_t off, n, valid;
    tiles.bounds(static_cast<int64_t>(t), off, n, valid);
    copy_rows(y + off, ld, cur, T_w, C, n);
    copy_rows(b + off, ld, bl, T_w, C, n);
    T* src = cur;
    T* dst = nxt;
    int64_t k = reached[t];
    candidate[t] = 0;
    while (k < until) {
      if ((k & 15) == 15 && poll.stop()) {
        aborted = true;
        return;
      }
      const T lr_k = scheduled ? rates[static_cast<size_t>(k - rates_from)] : lr;
      const bool check = ahead && k >= 1 && k % args.check_every == 0;
      if (check || k == measure_at || (stats && k == 0)) {
        const T m = lane_max(step_block<T, true>(mix, src, bl, dst, T_w, n, valid, lr_k));
        if (k == 0) {
          first[t] = m;
        }
        if (k == measure_at || check) {
          change[t] = m;
        }
        std::swap(src, dst);
        ++k;
        // NaN < tol is false: a diverged tile is never a candidate.
        if (check && m < tol) {
          candidate[t] = 1;
          break;
        }
      } else {
        step_block<T, false>(mix, src, bl, dst, T_w, n, valid, lr_k);
        std::swap(src, dst);
        ++k;
      }
    }
    reached[t] = k;
    copy_rows(src, T_w, y + off, ld, C, n);
  };
  // Calls run_tile for every tile not yet at `until`.
  const auto round = [&](int64_t until, bool ahead, int64_t measure_at, int64_t length) {
    const int64_t per_grab = std::max<int64_t>(1, tiles.grain / std::max<int64_t>(length, 1));
    for_tiles(tiles.count, per_grab, [&](auto&& grab) {
      // Tiles configured once for all of this thread's steps (amx.h).
      const AmxSession amx_session(mix);
      std::vector<T> local(static_cast<size_t>(3 * C * T_w));
      for (int64_t t0, t1; grab(t0, t1);) {
        for (int64_t t = t0; t < t1 && !aborted; ++t) {
          if (reached[static_cast<size_t>(t)] < until) {
            run_tile(static_cast<size_t>(t), until, ahead, measure_at, local.data(),
                     local.data() + C * T_w, local.data() + 2 * C * T_w);
          }
        }
      }
    });
    // Raises a pending interrupt on this thread; the caller's result is not used.
    return !poll.stop() && !aborted;
  };
  const int64_t last_measured = stats ? K - 1 : -1;
  int64_t start = 0;
  int64_t iterations = K;
  while (start < K) {
    // Windows double (64, 128, 256, ... iterations): a schedule's rates are
    // read one window at a time, and a loop of many rounds costs few.
    const int64_t H = std::min(K, start + std::max<int64_t>(64, start));
    if (scheduled) {
      rates.resize(static_cast<size_t>(H - start));
      for (int64_t k = start; k < H; ++k) {
        rates[static_cast<size_t>(k - start)] = static_cast<T>(lrs.at(k));
      }
      rates_from = start;
    }
    if (!round(H, true, last_measured, H - start)) {
      return iterations;
    }
    bool all_candidates = true;
    int64_t F = start;
    for (size_t t = 0; t < count; ++t) {
      all_candidates = all_candidates && candidate[t];
      F = std::max(F, reached[t] - 1);
    }
    if (!all_candidates) {
      if (!round(H, false, last_measured, H - start)) {
        return iterations;
      }
      start = H;
      continue;
    }
    if (!round(F + 1, false, F, F + 1 - start)) {
      return iterations;
    }
    const T m = nan_max_of(change);
    if (m < tol) {
      iterations = F + 1;
      if (stats) {
        stats->converged[0] = 1;
      }
      break;
    }
    start = F + 1;
  }
  if (stats && K > 0) {
    stats->first[0] = nan_max_of(first);
    stats->last[0] = nan_max_of(change);
    stats->iterations[0] = iterations;
  }
  return iterations;
}

} // namespace
} // namespace torchiter::cpu::CPU_CAPABILITY
