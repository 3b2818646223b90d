// The per-sample batch of the quadratic_descent kernel (quadratic_descent_ex
// with per_sample): each sample stops on its own test; the working copies
// hold the running samples only.
//
// Part of the CPU quadratic_descent kernel: included by quadratic_descent.cpp
// alone, once per instruction-set variant (see kernels.h), so its internal
// linkage gives every variant its own copy.
#pragma once

#include "loops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

// Copies n elements; a plain loop, because n is often 1 (a sample without
// spatial dims) and a memmove call per element would cost more than the copy.
template <typename T>
inline void copy_short(const T* from, int64_t n, T* to) {
  for (int64_t i = 0; i < n; ++i) {
    to[i] = from[i];
  }
}

// quadratic_descent_ex with per_sample for a batch without spatial dims
// (one position, so one vector lane, per sample), a constant rate, no trace
// and no GEMM: no sweeps at all. Each thread keeps a tile of running samples
// in L1 and steps it on its own; a sample that stops (its test passes, or
// it reaches max_iterations) is written out and the thread's next sample
// from the batch takes its lane at once, at its own iteration 0. So every
// sample runs exactly its own iterations, with no barrier per iteration and
// no lanes idling on stopped samples. A sample's arithmetic is the same in
// every lane, tile and thread, so results are those of the sweeps, bit for
// bit, at any thread count.
template <typename T>
void run_per_sample_rows(
    const at::Tensor& y0, const at::Tensor& b_in, const ChannelMixing<T>& mix,
    const QuadraticDescentArgs& args, T lr, at::Tensor& out, LoopStats<T>& stats,
    InterruptPoll& poll) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t B = y0.size(0), C = mix.C, K = args.max_iterations;
  const at::Tensor yc = y0.contiguous();
  const at::Tensor bc = b_in.contiguous();
  const T* y_in = yc.const_data_ptr<T>();
  const T* b_rows = bc.const_data_ptr<T>();
  T* o = out.data_ptr<T>();
  const bool stop_test = args.tol > 0;
  const T tol = static_cast<T>(args.tol);
  const Vec tol_vec(tol);
  const int64_t T_w = tile_width<T>(C);
  // Samples are handed out a vector's worth at a time: few enough to keep
  // the threads' shares even at the end, many enough that the shared
  // counter is rarely touched.
  constexpr int64_t kChunk = W;
  std::atomic<int64_t> next_sample{0};
  const int64_t tasks = std::clamp<int64_t>((B + T_w - 1) / T_w, 1, at::get_num_threads());
  const auto worker = [&](int64_t, int64_t) {
    // Tiles configured once for all of this thread's steps (amx.h).
    const AmxSession amx_session(mix);
    // A lane's item: its sample.
    LaneTile<T> tile(C, T_w, K);
    int64_t chunk_next = 0, chunk_end = 0;
    const auto finish = [&](int64_t p, bool converged) {
      const auto i = static_cast<size_t>(tile.item[static_cast<size_t>(p)]);
      stats.last[i] = tile.pmax[p];
      stats.iterations[i] = tile.ran(p);
      stats.converged[i] = converged ? 1 : 0;
      T* to = o + static_cast<int64_t>(i) * C;
      for (int64_t c = 0; c < C; ++c) {
        to[c] = tile.cur[c * T_w + p];
      }
      tile.stop(p);
    };
    // The thread's next sample of the batch into lane p; false when none is
    // left.
    const auto load_next = [&](int64_t p) {
      if (chunk_next == chunk_end) {
        chunk_next = std::min(B, next_sample.fetch_add(kChunk, std::memory_order_relaxed));
        chunk_end = std::min(B, chunk_next + kChunk);
        if (chunk_next == chunk_end) {
          return false;
        }
      }
      const int64_t i = chunk_next++;
      for (int64_t c = 0; c < C; ++c) {
        tile.cur[c * T_w + p] = y_in[i * C + c];
        tile.bl[c * T_w + p] = b_rows[i * C + c];
      }
      tile.enter(p, i);
      return true;
    };
    tile.fill(load_next);
    for (int64_t n; tile.next_step(poll, n);) {
      step_block_positions<T>(mix, tile.cur, tile.bl, tile.nxt, T_w, n, tile.count, lr, tile.pmax);
      tile.stepped();
      for (const int64_t p : tile.fresh) {
        stats.first[static_cast<size_t>(tile.item[static_cast<size_t>(p)])] = tile.pmax[p];
      }
      tile.fresh.clear();
      if (stop_test) {
        // Only lanes whose change is below tol can stop: a vector compare
        // finds them (NaN never is below), the rest of the test is theirs.
        for (int64_t s = 0; s < tile.count; s += W) {
          const int64_t lanes = std::min<int64_t>(W, tile.count - s);
          auto bits = static_cast<uint64_t>(~(Vec::loadu(tile.pmax + s) < tol_vec).zero_mask()) &
              ((uint64_t{1} << lanes) - 1);
          for (int64_t lane = 0; bits != 0; ++lane, bits >>= 1) {
            if (bits & 1) {
              const int64_t p = s + lane;
              const int64_t k = tile.ran(p) - 1;
              if (k >= 1 && k % args.check_every == 0) {
                finish(p, true);
              }
            }
          }
        }
      }
      // Lanes that ran their K iterations without passing: a scan at the
      // deadline finds them, and the next deadline among the others. Kept
      // apart from the test, which would cost an integer division per lane
      // there: with samples entering at different steps, some lane reaches
      // K on most steps.
      tile.at_deadline([&](int64_t p, bool ran_all) {
        if (ran_all) {
          finish(p, false);
        }
        return ran_all;
      });
      // Each stopped lane takes the thread's next sample at once; when the
      // batch is used up, the last running lane moves into it instead.
      tile.refill(load_next);
    }
  };
  if (tasks > 1) {
    at::parallel_for(0, tasks, 1, worker);
  } else {
    worker(0, 1);
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
  if (y0.numel() == y0.size(0) * y0.size(1) && !gemm && !args.trace && !lrs.scheduled() && args.max_iterations > 0) {
    run_per_sample_rows<T>(y0, b_in, mix, args, static_cast<T>(lrs.at(0)), out, stats, poll);
    return;
  }
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
    if (gemm || S > 1) {
      // The GEMM reads every slot, and a slot of several positions can
      // straddle tiles that other threads sweep: the moves go first.
      apply_moves(0, static_cast<int64_t>(moves.size()));
      moves.clear();
    }
    if (gemm) {
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
      // Tiles configured once for all of this thread's steps (amx.h).
      const AmxSession amx_session(mix);
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
    // their slots. The pairs are worked out here and copied before the
    // next sweep, or with one position per sample by the sweep itself, each
    // by the tile its slot falls in; no slot is both a source and a
    // destination, and the sources lie past the slots swept.
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

} // namespace
} // namespace torchiter::cpu::CPU_CAPABILITY
