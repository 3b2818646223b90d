// Layout and tiles of the quadratic_descent kernel: how (batch, C, spatial)
// positions are packed into the padded working copy (positions along the
// contiguous dim, one vector lane per position) and back, and how positions
// are cut into fixed-width tiles whose width depends only on C and the
// dtype, so that every position sees the same arithmetic at any thread count.
//
// Part of the CPU quadratic_descent kernel: included by quadratic_descent.cpp
// alone, once per instruction-set variant (see kernels.h), so its internal
// linkage gives every variant its own copy.
#pragma once

#include "columns.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

// From this many channels on, the plain x86-64 variant mixes channels with a
// BLAS GEMM per iteration: with 16-byte vectors its register blocks share
// each load among too few FMAs to keep up with a BLAS. The AVX2 and AVX-512
// variants' register-blocked kernel runs at 61-92% of the FMA peak from 64 to
// 1024 channels, at or above torch.mm's rate for the same product
// (benchmarks/bench_channels.py), and it is bitwise the same at any thread
// count: it is used at every channel count.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kGemmMinChannels = std::numeric_limits<int64_t>::max();
#else
constexpr int64_t kGemmMinChannels = 128;
#endif

// Tile width: a multiple of step_block's full column step (kColumnVectors
// vectors), as wide as keeps the three C x tile blocks a tile touches (y,
// its next value, b) within about 40 KiB, and never narrower than one full
// step. A narrower remainder step shares each load of y among fewer FMAs and
// runs at about half the rate (AVX-512, 1 thread: 59 GFLOP/s at C = 64 and
// 41 at C = 110-127 with such steps, 82 and 88 without), while blocks that
// spill from L1 to L2 cost little: a full step feeds 20 FMAs per 4 loads of y.
template <typename T>
int64_t tile_width(int64_t C) {
  constexpr int64_t step = kColumnVectors<T> * Vectorized<T>::size();
  const int64_t fit =
      (40 * 1024) / (3 * std::max<int64_t>(C, 1) * static_cast<int64_t>(sizeof(T)));
  return std::clamp<int64_t>((fit / step) * step, step, 256);
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

// Non-zero unless the element pair can belong to a position at rest (see
// rest_stays_at_zero): y0 must be +0 itself, b may be a zero of either sign.
template <typename T>
inline auto motion_bits(const T* y, const T* b) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  Bits yb, bb;
  std::memcpy(&yb, y, sizeof(T));
  std::memcpy(&bb, b, sizeof(T));
  return static_cast<Bits>(yb | (bb << 1));
}

// The positions of a contiguous (batch, C, *spatial) pair (y0, b) that are
// not at rest: y0 is not +0 or b is not zero in some channel (see
// rest_stays_at_zero). Each is given by the offset of its channel 0, in
// order; channel c is S elements further per channel.
template <typename T>
std::vector<int64_t> moving_offsets(const T* y, const T* b, int64_t B, int64_t C, int64_t S) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  std::vector<uint8_t> moving(static_cast<size_t>(B * S), 0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, C * S));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<Bits> any(static_cast<size_t>(S));
    for (int64_t bb = b0; bb < b1; ++bb) {
      std::fill(any.begin(), any.end(), Bits(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* yr = y + (bb * C + c) * S;
        const T* br = b + (bb * C + c) * S;
        for (int64_t s = 0; s < S; ++s) {
          any[static_cast<size_t>(s)] |= motion_bits(yr + s, br + s);
        }
      }
      for (int64_t s = 0; s < S; ++s) {
        moving[static_cast<size_t>(bb * S + s)] = any[static_cast<size_t>(s)] != 0;
      }
    }
  });
  std::vector<int64_t> offsets;
  for (int64_t p = 0; p < B * S; ++p) {
    if (moving[static_cast<size_t>(p)]) {
      offsets.push_back(p / S * C * S + p % S);
    }
  }
  return offsets;
}

// The working layout of the moving positions alone: one group of them.
template <typename T>
WorkingLayout moving_layout(const at::Tensor& y0, int64_t moving) {
  constexpr int64_t W = Vectorized<T>::size();
  const auto [B, C, S] = batch_channel_spatial(y0);
  return WorkingLayout{B, C, S, 1, moving, (moving + W - 1) / W * W, true};
}

// The moving positions of a contiguous (batch, C, *spatial) tensor into
// the working layout of moving_layout, and back into `out` (whose other
// positions the caller has set).
template <typename T>
at::Tensor gather_working(const T* src, const std::vector<int64_t>& offsets, const WorkingLayout& L, const at::TensorOptions& options) {
  const int64_t C = L.channels, S = L.spatial, ld = L.padded_positions;
  at::Tensor out = at::empty({1, C, ld}, options.memory_format(at::MemoryFormat::Contiguous));
  T* dst = out.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    T* row = dst + c * ld;
    for (int64_t m = 0; m < L.positions; ++m) {
      row[m] = src[offsets[static_cast<size_t>(m)] + c * S];
    }
    std::fill(row + L.positions, row + ld, T(0));
  }
  return out;
}

template <typename T>
void scatter_working(const at::Tensor& Y, const std::vector<int64_t>& offsets, const WorkingLayout& L, T* out) {
  const int64_t C = L.channels, S = L.spatial, ld = L.padded_positions;
  const T* src = Y.const_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    const T* row = src + c * ld;
    for (int64_t m = 0; m < L.positions; ++m) {
      out[offsets[static_cast<size_t>(m)] + c * S] = row[m];
    }
  }
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

} // namespace
} // namespace torchiter::cpu::CPU_CAPABILITY
