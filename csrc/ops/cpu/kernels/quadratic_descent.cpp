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
// The kernel is split by role, each part in quadratic_descent/:
//   steps.h       step primitives (mixing a tile's block, the projected update)
//   amx.h         the bfloat16 mixing on AMX tiles (hardware or emulated)
//   columns.h     one iteration of a block, on the mixing the loop asked for
//   layout.h      the working copy's layout and the tiles
//   loops.h       loop drivers for a batch that stops as a whole
//   per_sample.h  the per-sample batch (quadratic_descent_ex, per_sample)
// This file picks the driver: to_working() packs y0 and b, run_lanes()
// (tol == 0 and one rate: each thread's tile in L1 runs positions until they
// reach a fixed point or max_iterations, refilling their lanes as they
// stop), run_blocked() (tol == 0 with a schedule, or a handful of channels:
// each tile runs all iterations while it sits in L1, one read and one write
// of y in total), run_tiles_ahead() (tol > 0: tiles run ahead in L1 while
// their own change shows the stop test cannot pass, and meet where it might)
// or run_sweeps() (a trace, or in the plain x86-64 variant from
// kGemmMinChannels channels on: one parallel sweep over y per iteration that
// also yields max |y_k - y_{k-1}|, after a BLAS GEMM of A with the
// (C, positions) matrix), then from_working() unpacks the result, mirroring the CUDA file.
// When positions are per sample, or the batch has no spatial dims and more
// than a handful of channels, run_lanes() and run_blocked() read from y0 and b
// and write the result directly (transposing (B, C) rows tile by tile, on
// every thread), with no working copy.
#include "quadratic_descent/per_sample.h"
#include "quadratic_descent/sparse_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <vector>

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

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

// A rounded to bfloat16 in pairs, where the loop may mix on bfloat16 dot
// products and this CPU has them: for VDPBF16PS (ChannelMixing::A_pairs) or,
// where the CPU has AMX-BF16, for the tiles (A_tiles); else both empty (the
// mixing stays in float32).
struct Bf16Pairs {
  std::vector<uint32_t> pairs, tiles;
  int64_t tile_pairs = 0;
  bool emulated = false;

  void attach(ChannelMixing<float>& mix) const {
    if (!tiles.empty()) {
      mix.A_tiles = tiles.data();
      mix.tile_pairs = tile_pairs;
      mix.amx_emulated = emulated;
    } else if (!pairs.empty()) {
      mix.A_pairs = pairs.data();
      mix.pairs = (mix.C + 1) / 2;
    }
  }
};

template <typename T>
Bf16Pairs bf16_pairs_of(const at::Tensor& A, const QuadraticDescentArgs& args, bool diagonal, bool gemm) {
  Bf16Pairs out;
#ifdef TORCHITER_BF16_MIXING
  if constexpr (std::is_same_v<T, float>) {
    const int64_t C = A.size(0);
    if (args.bf16_mixing && !diagonal && !gemm && C >= kBf16MinChannels && cpu_has_avx512_bf16()) {
      const float* a = A.const_data_ptr<float>();
#ifdef TORCHITER_AMX_MIXING
      if (const AmxMode mode = amx_mode(); mode != AmxMode::kOff) {
        out.tiles = amx_pairs_of(a, C, out.tile_pairs);
        out.emulated = mode == AmxMode::kEmulated;
        return out;
      }
#endif
      out.pairs = bf16_pair_rows(a, C, (C + 1) / 2, C);
    }
  }
#else
  (void)A, (void)args, (void)diagonal, (void)gemm;
#endif
  return out;
}

// Below this share of spared iterations on its sample, a batch goes to
// run_blocked: where nothing settles, run_lanes' per-position loads and
// checks cost about 6% more per iteration (the MNIST conv layer late in
// training, benchmarks/README.md).
constexpr double kMinSpared = 0.1;

// No stop test and one rate for every iteration (see run_lanes). run_lanes
// takes a sample of the batch first (a sixteenth of its groups, or of its
// positions, and at least two tiles' worth); the rest goes to run_lanes too
// where the sample's positions were spared at least kMinSpared of their
// iterations, else to run_blocked's tiles. Both compute every position the
// same way, so the choice only changes the time.
template <typename T>
void run_one_rate(
    const BlockedIO<T>& io, const ChannelMixing<T>& mix, const WorkingLayout& L, int64_t K,
    LearningRates& lrs, LoopStats<T>* stats, InterruptPoll& poll) {
  constexpr int64_t W = Vectorized<T>::size();
  const T lr = static_cast<T>(lrs.at(0));
  const int64_t total = L.groups * L.positions;
  const int64_t sample = L.groups > 1
      ? (L.groups + 15) / 16 * L.positions
      : std::min(total, (std::max(total / 16, 2 * tile_width<T>(L.channels)) + W - 1) / W * W);
  const double spared = run_lanes<T>(io, mix, L.positions, 0, sample, K, lr, stats, poll);
  if (sample >= total || poll.stop()) {
    return;
  }
  if (spared >= kMinSpared) {
    run_lanes<T>(io, mix, L.positions, sample, total, K, lr, stats, poll);
    return;
  }
  // The rest of the batch on run_blocked's tiles: the groups after the
  // sample's, or the positions after it (the sample is a multiple of the
  // vector width, so a working copy's padding still ends the row).
  WorkingLayout R = L;
  BlockedIO<T> rest = io;
  int64_t shift;
  if (L.groups > 1) {
    R.groups = L.groups - sample / L.positions;
    shift = sample / L.positions * io.group_stride;
  } else {
    R.positions = L.positions - sample;
    R.padded_positions = (R.positions + W - 1) / W * W;
    shift = sample * io.position_stride;
  }
  rest.y += shift;
  rest.b += shift;
  rest.out += shift;
  const Tiles tiles = make_tiles<T>(R, /*gemm=*/false, /*diagonal=*/false);
  run_blocked<T>(rest, mix, tiles, K, lrs, stats, poll);
}

// Whether a loop of run() goes to the sparse drivers, run_sparse_rows or
// run_sparse_blocks (given a batch without spatial dims and no stop test):
// mixing by the kernel's own float FMA chains, 64 to kSparseMaxChannels
// channels, a projection that can give exact zeros, and a finite A (a zero
// times an infinite A_ij is NaN in the dense chain).
template <typename T>
bool sparse_rows_apply(
    const ChannelMixing<T>& mix, const QuadraticDescentArgs& args, const at::Tensor& A, bool allowed) {
  const int64_t C = mix.C;
  const bool zeros = args.shrink > 0 || (args.min && *args.min == 0) || (args.max && *args.max == 0);
  return allowed && kSparseRows<T> && zeros && args.max_iterations > 0 && !mix.diagonal && mix.A_pairs == nullptr &&
      mix.A_tiles == nullptr && C >= kSparseMinChannels && C <= kSparseMaxChannels && all_finite<T>(A);
}

template <typename T>
QuadraticDescentResult run(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b_in,
    const QuadraticDescentArgs& args, LearningRates& lrs, bool diagonal) {
  constexpr int64_t W = Vectorized<T>::size();
  // Read (and checked) on every call, whichever loop runs.
  const SparseRows sparse_request = sparse_rows_request();
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
  const Bf16Pairs pairs = bf16_pairs_of<T>(A, args, diagonal, gemm);
  ChannelMixing<T> mix(A.const_data_ptr<T>(), y0.size(1), &proj, diagonal);
  if constexpr (std::is_same_v<T, float>) {
    pairs.attach(mix);
  }
  if (args.per_sample) {
    y = at::empty(y0.sizes(), y0.options().memory_format(at::MemoryFormat::Contiguous));
    run_per_sample<T>(y0, b_in, A, mix, gemm, args, lrs, y, *stats, poll);
  } else {
    const WorkingLayout L = working_layout<T>(y0, gemm);
    const Tiles tiles = make_tiles<T>(L, gemm, diagonal);
    LoopStats<T>* st = stats ? &*stats : nullptr;
    const bool blocked = !(args.tol > 0 || gemm || args.trace);
    // The positions of `lay` (L, or the part of it after the sparse rows'
    // sample) with `tl` its tiles.
    const auto run_without_test = [&](const BlockedIO<T>& io, const WorkingLayout& lay, const Tiles& tl) {
      if (diagonal) {
        run_diagonal<T>(io, mix, lay.groups, lay.positions, args.max_iterations, lrs, st, poll);
      } else if (!lrs.scheduled() && args.max_iterations > 0 && lay.channels > 8) {
        run_one_rate<T>(io, mix, lay, args.max_iterations, lrs, st, poll);
      } else {
        run_blocked<T>(io, mix, tl, args.max_iterations, lrs, st, poll);
      }
    };
    // A stop test: tiles that run ahead in L1 (run_tiles_ahead), or one sweep
    // per iteration where each follows a GEMM or a trace wants every
    // iteration's change.
    const auto with_test = [&](at::Tensor& Y, const at::Tensor& Bw, const Tiles& tl) {
      return gemm || args.trace ? run_sweeps<T>(Y, Bw, A, mix, tl, gemm, args, lrs, st, poll)
                                : run_tiles_ahead<T>(Y, Bw, mix, tl, args, lrs, st, poll);
    };
    // A batch without spatial dims goes straight into the tiles too (each
    // tile transposes its rows), except for a handful of channels, where the
    // working copy's transpose with a compile-time C is the faster one, and
    // for a diagonal A, whose loop reads rows of positions.
    const bool rows_in_tiles = blocked && L.batch_folded && L.spatial == 1 && L.channels > 8 && !diagonal;
    const at::Tensor yc = y0.contiguous();
    const at::Tensor bc = b_in.contiguous();
    // Rows whose zeros the mixing skips (sparse_rows.h): a sample of the
    // batch first, the rest too where the sample's y was sparse enough (or
    // TORCHITER_SPARSE=1 asks for it).
    const bool sparse_rows = rows_in_tiles && sparse_rows_apply<T>(mix, args, A, sparse_request != SparseRows::kOff);
    if (sparse_rows) {
      const int64_t C = L.channels, total = L.positions, K = args.max_iterations;
      const int64_t Cp = round_up(C, W);
      // Up to kSparseMaxBytes of A_T, each row on its own (run_sparse_rows);
      // past it, blocks of rows by slices of A_T (run_sparse_blocks).
      const bool by_blocks = Cp * C * static_cast<int64_t>(sizeof(T)) > kSparseMaxBytes;
      // Each driver's layout of A, made when that driver first runs.
      at::Tensor A_rows, A_slices;
      const std::vector<T> rates = scheduled_rates<T>(lrs, K);
      const T lr = static_cast<T>(lrs.at(0));
      y = at::empty(y0.sizes(), y0.options().memory_format(at::MemoryFormat::Contiguous));
      const T* yp = yc.const_data_ptr<T>();
      const T* bp = bc.const_data_ptr<T>();
      T* out = y.data_ptr<T>();
      const T* rp = rates.empty() ? nullptr : rates.data();
      const auto sparse = [&](int64_t from, int64_t to, bool blocks) {
        if (blocks) {
          if (!A_slices.defined()) {
            A_slices = sliced_A<T>(A, kSparseSliceVecs * W);
          }
          return run_sparse_blocks<T>(yp, bp, out, C, A_slices.const_data_ptr<T>(), from, to, K, rp, lr, proj, st, poll);
        }
        if (!A_rows.defined()) {
          A_rows = transposed_padded<T>(A, Cp);
        }
        return run_sparse_rows<T>(yp, bp, out, C, A_rows.const_data_ptr<T>(), Cp, from, to, K, rp, lr, proj, st, poll);
      };
      const int64_t sample = std::min(total, std::max<int64_t>(total / 16, 256));
      const double density = sparse(0, sample, by_blocks);
      if (sample < total && !poll.stop()) {
        if (density <= sparse_max_density<T>(C, Cp) || sparse_request == SparseRows::kForce) {
          // Rows whose non-zeros read more of A_T than L1 holds: the rest by
          // blocks. Both drivers give the dense loop's values.
          sparse(sample, total, by_blocks || rows_outgrow_l1<T>(density, C, Cp));
        } else {
          WorkingLayout R = L;
          R.positions = total - sample;
          R.padded_positions = round_up(R.positions, W);
          run_without_test({yp + sample * C, bp + sample * C, out + sample * C, 1, 0, C}, R, make_tiles<T>(R, gemm, diagonal));
        }
      }
    } else if (blocked && (!L.batch_folded || rows_in_tiles)) {
      // Tiles straight from the inputs into the output: no working copies
      // (for a large conv layer they cost as much as the loop's own time,
      // and they would run on one thread).
      y = at::empty(y0.sizes(), y0.options().memory_format(at::MemoryFormat::Contiguous));
      // (B, C, S) as C rows of positions: per sample, rows S apart and
      // positions adjacent; (B, C) rows, channels adjacent and positions C apart.
      const int64_t S = L.spatial;
      BlockedIO<T> io{yc.const_data_ptr<T>(), bc.const_data_ptr<T>(), y.data_ptr<T>(), S, L.channels * S};
      if (rows_in_tiles) {
        io.row_stride = 1;
        io.group_stride = 0;
        io.position_stride = L.channels;
      }
      run_without_test(io, L, tiles);
    } else if (const std::vector<int64_t> offsets = !blocked && !gemm && rest_stays_at_zero(mix)
                   ? moving_offsets<T>(yc.const_data_ptr<T>(), bc.const_data_ptr<T>(), L.batch, L.channels, L.spatial)
                   : std::vector<int64_t>();
               static_cast<int64_t>(offsets.size()) < L.batch * L.spatial && !offsets.empty()) {
      // Positions at rest: the sweeps of a stop test or a trace run over
      // the moving positions alone. The others stay +0 and change by 0 in
      // every iteration, which neither the stop test nor the statistics see.
      const WorkingLayout Lm = moving_layout<T>(y0, static_cast<int64_t>(offsets.size()));
      const Tiles tm = make_tiles<T>(Lm, gemm, diagonal);
      at::Tensor Y = gather_working<T>(yc.const_data_ptr<T>(), offsets, Lm, y0.options());
      const at::Tensor Bw = gather_working<T>(bc.const_data_ptr<T>(), offsets, Lm, y0.options());
      iterations = with_test(Y, Bw, tm);
      y = at::zeros(y0.sizes(), y0.options().memory_format(at::MemoryFormat::Contiguous));
      scatter_working<T>(Y, offsets, Lm, y.data_ptr<T>());
    } else {
      at::Tensor Y = to_working<T>(yc, L);
      const at::Tensor Bw = to_working<T>(bc, L);
      if (blocked) {
        const int64_t ld = L.padded_positions;
        run_without_test({Y.const_data_ptr<T>(), Bw.const_data_ptr<T>(), Y.data_ptr<T>(), ld, L.channels * ld}, L, tiles);
      } else {
        iterations = with_test(Y, Bw, tiles);
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

const char* bf16_mixing_units() {
#ifdef TORCHITER_BF16_MIXING
  if (cpu_has_avx512_bf16()) {
#ifdef TORCHITER_AMX_MIXING
    switch (amx_mode()) {
      case AmxMode::kHardware:
        return "amx";
      case AmxMode::kEmulated:
        return "amx-emulated";
      case AmxMode::kOff:
        break;
    }
#endif
    return "avx512_bf16";
  }
#endif
  return "none";
}

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
