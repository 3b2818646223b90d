// A loop driver of the quadratic_descent kernel that skips exact zeros of y:
// run_sparse_rows, for a batch without spatial dims, no stop test and no
// trace, whose projection can give exact zeros (ReLU, a clamp at 0, soft
// thresholding).
//
// Under such a projection much of y is exactly zero: half of it for random
// inputs, about 70% in the MNIST conv layer. The dense chain of channel i at
// a position is acc = fma(A_ij, y_j, acc) for j = 0 .. C - 1 from acc = +0;
// a zero y_j adds A_ij * y_j = +-0, which leaves a non-zero acc unchanged,
// and a zero acc a zero (its sign can differ where an earlier product
// underflowed to -0) as long as A_ij is finite (0 * inf is NaN). Summing
// only the non-zero y_j, in the same ascending order, gives the same values
// with fewer FMAs. A NaN or an infinity in y is non-zero and is summed as the
// dense chain sums it.
//
// Skipping needs y by position, not by channel, and a (B, C) batch already
// is: each row (one position) runs all its iterations on its own in L1, as
// a list of its non-zero channels (found with one compare per vector), sums
// of A's columns for those channels only (A_T's rows: one broadcast and C / W
// FMAs per non-zero y_j), and the same projected update as every other path
// (next_value). A row that an iteration leaves bit for bit unchanged (and
// finite) is at a fixed point of the loop's arithmetic and stops, as
// run_lanes' positions do. Rows never share arithmetic, so results do not
// depend on the thread count.
//
// Part of the CPU quadratic_descent kernel: included by quadratic_descent.cpp
// alone, once per instruction-set variant (see kernels.h).
#pragma once

#include "loops.h"

#include <array>
#include <cstdint>
#include <cstring>
#include <limits>

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

// Output channels summed per pass over a row's non-zero list: their
// accumulators stay in registers (16 of 32 vector registers with AVX-512,
// 8 of 16 otherwise); wider rows take several passes.
template <typename T>
constexpr int kSparseChunk = sizeof(Vectorized<T>) >= 64 ? 16 : 8;

// Only the AVX-512 and AVX2 variants skip zeros, and only in float32. At
// half density (1 thread, 4,096 rows, 50 iterations) AVX-512 runs 64- to
// 128-channel loops 1.15-1.4x faster than the dense kernel, and AVX2 (run
// on the same core) 1.22x at 64 channels, 1.27x at 96, 1.05x at 128. The
// plain x86-64 variant's rows ran 0.46x as fast (no vector FMA or compress),
// and float64 rows (AVX-512: 8 lanes) 0.96-1.05x from 64 to 90 channels.
template <typename T>
constexpr bool kSparseRows =
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    std::is_same_v<T, float>;
#else
    false;
#endif

// Fewer channels than this: the dense kernel's register blocks win at half
// density (float, 1 thread: 32 channels 0.6x, 48 0.95x, 56 1.0x, 64 1.2x,
// 80 1.3x, 96 1.4x), each non-zero's few FMAs no longer paying for finding
// it and for the row's update.
constexpr int64_t kSparseMinChannels = 64;

// A_T larger than this (from 129 channels on): the non-zero rows of
// A_T that one row reads no longer fit L1, and reading them from L2 for
// every non-zero costs more than the skipped FMAs save (AVX-512, 1 thread,
// half density: 192 channels 0.81x the dense kernel, 256 0.98x, 512 0.93x).
constexpr int64_t kSparseMaxBytes = 64 * 1024;

// The most rows in flight per thread (run_sparse_rows).
constexpr int kSparseSlots = 2;

// Rows in flight per thread: two where A_T fits a 32 KiB L1 (the other
// row's steps fill the core while one row's dependent steps wait: 64 float
// channels 1.23x the dense kernel with two rows, 1.11x with one), else one,
// whose non-zero rows of A_T (about half, mostly the same ones from one
// iteration to the next) then stay in L1 longest (128 channels: 1.18x with
// one row, 1.04x with two).
template <typename T>
int sparse_slots(int64_t C, int64_t Cp) {
  const int64_t bytes = C * Cp * static_cast<int64_t>(sizeof(T));
  return bytes <= 32 * 1024 ? 2 : 1;
}

// The largest share of non-zero entries of y (over the iterations of a
// sample of the batch) at which the rows go on sparse; above it the rest of
// the batch goes to the dense kernel, whose register blocks share each load
// among more FMAs. Measured (AVX-512, 1 thread, 4,096 rows, the share set
// by b's mean): 64 channels 1.16x the dense kernel at 49% non-zero, 1.01x at
// 60%, 0.92x at 70%; 128 channels 1.14x at 50%, 0.82x at 61%, 0.68x at 71%
// (more of A_T's rows to keep in L1).
template <typename T>
double sparse_max_density(int64_t C, int64_t Cp) {
  return C * Cp * static_cast<int64_t>(sizeof(T)) <= 32 * 1024 ? 0.58 : 0.54;
}

// The non-zero entries of y[0, C) (NaN counts as non-zero, -0 as zero): their
// offsets in A_T (j * Cp) to off[0, n) and their values to val[0, n);
// returns n. Both buffers need C + W entries: the last vector's stores
// run past n.
template <typename T>
inline int64_t nonzeros(const T* y, int64_t C, int64_t Cp, int32_t* off, T* val) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    // The register forms of VCOMPRESS: their memory forms are microcoded on
    // some cores.
    __m512i at = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int32_t>(Cp)));
    const __m512i step = _mm512_set1_epi32(static_cast<int32_t>(16 * Cp));
    int64_t n = 0;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 live = C - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (C - c)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(live, y + c);
      const __mmask16 m = _mm512_mask_cmp_ps_mask(live, v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
      _mm512_storeu_si512(off + n, _mm512_maskz_compress_epi32(m, at));
      _mm512_storeu_ps(val + n, _mm512_maskz_compress_ps(m, v));
      n += __builtin_popcount(static_cast<unsigned>(m));
      at = _mm512_add_epi32(at, step);
    }
    return n;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    // AVX2 has no VCOMPRESS: a table gives each 8-bit mask's left-packing
    // permutation (the indices of its set bits, 4 bits each).
    static const std::array<uint32_t, 256> packing = [] {
      std::array<uint32_t, 256> t{};
      for (uint32_t m = 0; m < 256; ++m) {
        uint32_t p = 0;
        for (uint32_t i = 0, k = 0; i < 8; ++i) {
          if (m >> i & 1u) {
            p |= i << (4 * k++);
          }
        }
        t[m] = p;
      }
      return t;
    }();
    const __m256i nibbles = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i seven = _mm256_set1_epi32(7);
    __m256i at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int32_t>(Cp)));
    const __m256i step = _mm256_set1_epi32(static_cast<int32_t>(8 * Cp));
    int64_t n = 0;
    for (int64_t c = 0; c < C; c += 8) {
      // Lanes past C (y's padding, any value) are masked out.
      const unsigned live = C - c >= 8 ? 0xFFu : (1u << (C - c)) - 1;
      const __m256 v = _mm256_loadu_ps(y + c);
      const unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ))) & live;
      const __m256i perm = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(packing[m])), nibbles), seven);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(off + n), _mm256_permutevar8x32_epi32(at, perm));
      _mm256_storeu_ps(val + n, _mm256_permutevar8x32_ps(v, perm));
      n += __builtin_popcount(m);
      at = _mm256_add_epi32(at, step);
    }
    return n;
  }
#endif
  int64_t n = 0;
  for (int64_t j = 0; j < C; ++j) {
    off[n] = static_cast<int32_t>(j * Cp);
    val[n] = y[j];
    n += y[j] != T(0) ? 1 : 0;
  }
  return n;
}

// Bit i set where lane i of a and b differ in any bit.
template <typename T>
inline uint32_t differing_lanes(const Vectorized<T>& a, const Vectorized<T>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_cmpneq_epi32_mask(_mm512_castps_si512(a), _mm512_castps_si512(b));
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_cmpneq_epi64_mask(_mm512_castpd_si512(a), _mm512_castpd_si512(b));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256i eq = _mm256_cmpeq_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b));
    return ~static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(eq))) & 0xFFu;
  }
#endif
  constexpr int64_t W = Vectorized<T>::size();
  T x[W], z[W];
  a.store(x);
  b.store(z);
  uint32_t m = 0;
  for (int64_t i = 0; i < W; ++i) {
    m |= std::memcmp(x + i, z + i, sizeof(T)) != 0 ? 1u << i : 0u;
  }
  return m;
}

// Output channels [c0, c0 + NA * W) of one row's step: the sums over its
// non-zero list, then next_value into yn (DELTA: the lane-wise max |new -
// old| over channels below C folded into dmax).
template <typename T, int NA, bool SHRINK, bool DELTA>
TORCHITER_INLINE void sparse_row_chunk(
    const VecProjection<T>& project, const T* A_T, const int32_t* off, const T* val, int64_t n,
    const T* y, const T* b, T* yn, int64_t c0, int64_t C, const Vectorized<T>& neg_lr,
    Vectorized<T>& dmax, uint32_t& changed) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  // Copied from one zero, not constructed in place: GCC otherwise keeps a
  // zeroed copy of the array on the stack.
  const Vec zero(static_cast<T>(0));
  Vec acc[NA];
  TORCHITER_UNROLL
  for (int v = 0; v < NA; ++v) {
    acc[v] = zero;
  }
  const T* a0 = A_T + c0;
  for (int64_t t = 0; t < n; ++t) {
    const Vec yj(val[t]);
    const T* a = a0 + off[t];
    TORCHITER_UNROLL
    for (int v = 0; v < NA; ++v) {
      acc[v] = at::vec::fmadd(Vec::loadu(a + v * W), yj, acc[v]);
    }
  }
  TORCHITER_UNROLL
  for (int v = 0; v < NA; ++v) {
    const int64_t at = c0 + v * W, lanes = C - at;
    const Vec old = Vec::loadu(y + at);
    const Vec nv = next_value<SHRINK>(project, acc[v], Vec::loadu(b + at), old, neg_lr);
    nv.store(yn + at);
    if constexpr (DELTA) {
      dmax = max_change(dmax, masked_delta(nv, old, lanes));
    }
    // Lanes past C (padding) do not count.
    const uint32_t live = lanes >= W ? ~0u : (1u << lanes) - 1;
    changed |= differing_lanes(nv, old) & live;
  }
}

// What one step of a row did: max |new - old| over its C channels (NaN if
// any is; 0 without DELTA), and whether any channel changed in any bit.
template <typename T>
struct RowStep {
  T change;
  bool changed;
};

// One step of one row (y, b, yn padded to Cp).
template <typename T, bool SHRINK, bool DELTA>
inline RowStep<T> sparse_row_step(
    const VecProjection<T>& project, const T* A_T, int64_t Cp, const int32_t* off, const T* val,
    int64_t n, const T* y, const T* b, T* yn, int64_t C, const Vectorized<T>& neg_lr) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t chunk = kSparseChunk<T> * W;
  Vec dmax(static_cast<T>(0));
  uint32_t changed = 0;
  int64_t c0 = 0;
  for (; c0 + chunk <= Cp; c0 += chunk) {
    sparse_row_chunk<T, kSparseChunk<T>, SHRINK, DELTA>(project, A_T, off, val, n, y, b, yn, c0, C, neg_lr, dmax, changed);
  }
  // The last pass, a whole number of vectors narrower than a chunk.
  switch ((Cp - c0) / W) {
#define TORCHITER_SPARSE_TAIL(NA)                                                                          \
  case NA:                                                                                                 \
    sparse_row_chunk<T, NA, SHRINK, DELTA>(project, A_T, off, val, n, y, b, yn, c0, C, neg_lr, dmax, changed); \
    break;
    TORCHITER_SPARSE_TAIL(1)
    TORCHITER_SPARSE_TAIL(2)
    TORCHITER_SPARSE_TAIL(3)
    TORCHITER_SPARSE_TAIL(4)
    TORCHITER_SPARSE_TAIL(5)
    TORCHITER_SPARSE_TAIL(6)
    TORCHITER_SPARSE_TAIL(7)
#undef TORCHITER_SPARSE_TAIL
    default: {
      // 8 .. kSparseChunk - 1 vectors (AVX-512 only): two passes.
      const int64_t rest = (Cp - c0) / W;
      if (rest >= 8) {
        sparse_row_chunk<T, 8, SHRINK, DELTA>(project, A_T, off, val, n, y, b, yn, c0, C, neg_lr, dmax, changed);
        c0 += 8 * W;
        for (; c0 < Cp; c0 += W) {
          sparse_row_chunk<T, 1, SHRINK, DELTA>(project, A_T, off, val, n, y, b, yn, c0, C, neg_lr, dmax, changed);
        }
      }
      break;
    }
  }
  return {DELTA ? lane_max(dmax) : T(0), changed != 0};
}

// A transposed for run_sparse_rows: row j holds column j of A, Cp = C
// rounded up to the vector width long, zero-padded.
// Rows start at the allocation's 64-byte alignment (ATen's CPU allocator),
// every row a cache line where Cp floats are a multiple of 64 bytes:
// a vector load that straddles two lines takes two of the core's load slots,
// and the sums are bound by those loads.
template <typename T>
at::Tensor transposed_padded(const at::Tensor& A, int64_t Cp) {
  const int64_t C = A.size(0);
  at::Tensor t = at::zeros({C, Cp}, A.options());
  t.narrow(1, 0, C).copy_(A.t());
  return t;
}

// n elements of T in `storage`, from a 64-byte boundary.
template <typename T>
T* aligned_in(std::vector<T>& storage, int64_t n) {
  storage.assign(static_cast<size_t>(n) + 64 / sizeof(T), T(0));
  const auto at = reinterpret_cast<std::uintptr_t>(storage.data());
  return reinterpret_cast<T*>((at + 63) / 64 * 64);
}

// Runs rows [begin, end) of the (rows, C) y0 and b (contiguous) into out,
// K iterations each (rates[k] if `rates`, else lr), stopping a row at a fixed
// point once the rates stay the same. With `stats`, each row's first and K-th changes are folded in (a
// fixed row's later changes are 0). Returns the share of non-zero entries of
// y over the iterations run.
template <typename T>
double run_sparse_rows(
    const T* y0, const T* b, T* out, int64_t C, const T* A_T, int64_t Cp, int64_t begin,
    int64_t end, int64_t K, const T* rates, T lr, const VecProjection<T>& project,
    LoopStats<T>* stats, InterruptPoll& poll) {
  constexpr int64_t W = Vectorized<T>::size();
  std::atomic<int64_t> nonzero_total{0}, entries_total{0};
  // The first iteration from which every rate has the same bits: a row may
  // stop at a fixed point only from there on.
  int64_t steady = 0;
  if (rates != nullptr && K > 0) {
    steady = K - 1;
    while (steady > 0 && std::memcmp(rates + steady - 1, rates + K - 1, sizeof(T)) == 0) {
      --steady;
    }
  }
  T first_max = 0, last_max = 0;
  std::mutex stats_mutex;
  // A task's grab: ~64k FMAs of work at half density.
  const int64_t per_row = std::max<int64_t>(1, C * C * K / 2);
  const int64_t per_grab = std::clamp<int64_t>(65536 / per_row, 1, 64);
  const int64_t rows = std::max<int64_t>(end - begin, 0);
  for_tiles(rows, per_grab, [&](auto&& grab) {
    // kSparseSlots rows in flight, each at its own iteration: one row's
    // iteration is a chain of dependent steps (its non-zero list, the sums,
    // the update that the next list reads), and the other rows' steps fill
    // the core while it waits.
    const int G = sparse_slots<T>(C, Cp);
    const int64_t stride = 4 * Cp + W;
    std::vector<T> buf_storage;
    std::vector<int32_t> off_storage;
    T* const buf = aligned_in(buf_storage, G * stride);
    int32_t* const offs = aligned_in(off_storage, G * (Cp + W));
    T* y[kSparseSlots];
    T* yn[kSparseSlots];
    T* bb[kSparseSlots];
    T* val[kSparseSlots];
    int32_t* off[kSparseSlots];
    int64_t row[kSparseSlots], k[kSparseSlots];
    for (int g = 0; g < G; ++g) {
      y[g] = buf + g * stride;
      yn[g] = y[g] + Cp;
      bb[g] = yn[g] + Cp;
      val[g] = bb[g] + Cp;
      off[g] = offs + g * (Cp + W);
      row[g] = -1;
    }
    int64_t next = 0, last = 0;
    int64_t my_nonzero = 0, my_entries = 0;
    T my_first = 0, my_last = 0;
    // Loads the worker's next row into slot g; false when none is left.
    const auto load = [&](int g) {
      if (next == last) {
        int64_t r0, r1;
        if (poll.stop() || !grab(r0, r1)) {
          row[g] = -1;
          return false;
        }
        next = begin + r0;
        last = begin + r1;
      }
      row[g] = next++;
      k[g] = 0;
      std::memcpy(y[g], y0 + row[g] * C, static_cast<size_t>(C) * sizeof(T));
      std::memcpy(bb[g], b + row[g] * C, static_cast<size_t>(C) * sizeof(T));
      return true;
    };
    const auto run = [&](auto shrink) {
      constexpr bool SH = decltype(shrink)::value;
      int active = 0;
      for (int g = 0; g < G; ++g) {
        active += load(g) ? 1 : 0;
      }
      for (int64_t steps = 0; active > 0; ++steps) {
        // A row of many iterations can take seconds on its own.
        if ((steps & 4095) == 4095 && poll.stop()) {
          return;
        }
        for (int g = 0; g < G; ++g) {
          if (row[g] < 0) {
            continue;
          }
          const int64_t kg = k[g];
          const Vectorized<T> neg_lr(-(rates ? rates[kg] : lr));
          const int64_t n = nonzeros(y[g], C, Cp, off[g], val[g]);
          my_nonzero += n;
          my_entries += C;
          RowStep<T> step;
          if (stats && (kg == 0 || kg == K - 1)) {
            step = sparse_row_step<T, SH, true>(project, A_T, Cp, off[g], val[g], n, y[g], bb[g], yn[g], C, neg_lr);
            if (kg == 0) {
              my_first = nan_max(my_first, step.change);
            }
            if (kg == K - 1) {
              my_last = nan_max(my_last, step.change);
            }
          } else {
            step = sparse_row_step<T, SH, false>(project, A_T, Cp, off[g], val[g], n, y[g], bb[g], yn[g], C, neg_lr);
          }
          std::swap(y[g], yn[g]);
          k[g] = kg + 1;
          // Unchanged bits, all finite, and the same rate from here on:
          // every later iteration computes the same function of the same
          // bits. (A changing rate changes the function: a warm-up from 0
          // leaves every row unchanged at first, and soft thresholding's
          // fixed points move with the rate.) An infinity or a NaN changes
          // by NaN in the dense loop.
          const bool done = k[g] == K ||
              (!step.changed && kg >= steady &&
               std::all_of(y[g], y[g] + C, [](T v) { return std::isfinite(v); }));
          if (done) {
            std::memcpy(out + row[g] * C, y[g], static_cast<size_t>(C) * sizeof(T));
            if (!load(g)) {
              --active;
            }
          }
        }
      }
    };
    project.use_shrink ? run(std::true_type{}) : run(std::false_type{});
    nonzero_total += my_nonzero;
    entries_total += my_entries;
    if (stats) {
      const std::lock_guard<std::mutex> lock(stats_mutex);
      first_max = nan_max(first_max, my_first);
      last_max = nan_max(last_max, my_last);
    }
  });
  count_sparse_rows(rows);
  if (stats) {
    stats->measured_part(first_max, last_max, K);
  }
  const int64_t entries = entries_total.load();
  return entries > 0 ? static_cast<double>(nonzero_total.load()) / static_cast<double>(entries) : 0.0;
}

} // namespace
} // namespace torchiter::cpu::CPU_CAPABILITY
