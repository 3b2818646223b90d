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
// With more channels A_T no longer fits L1, and run_sparse_blocks runs
// blocks of rows together, by slices of A_T that do (see there).
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

// A_T larger than this (from 129 channels on) goes to run_sparse_blocks:
// the non-zero rows of A_T that one row reads no longer fit L1, and reading
// them from L2 for every non-zero cost more than the skipped FMAs saved
// (run_sparse_rows, AVX-512, 1 thread, half density: 192 channels 0.81x the
// dense kernel, 256 0.98x, 512 0.93x).
constexpr int64_t kSparseMaxBytes = 64 * 1024;

// Where a row's non-zero channels select more of A_T than this (their rows
// of A_T, at the density the batch's first rows measured), the rest of the
// batch runs by blocks of rows even under kSparseMaxBytes: those rows of A_T
// no longer stay in a 32 KiB L1 beside the row's own. AVX2-only AMD EPYC
// (Zen 3), 1 thread, 4,096 rows of 128 channels: at 50% non-zero (32 KiB of
// A_T) each row on its own ran 0.88x the dense kernel and blocks 1.03x; at
// 31% (20 KiB) 1.74x against 1.40x; 112 channels at 50% (25 KiB) 1.09x
// against 0.95x. With AVX-512 (Zen 4) rows of 128 channels ran 1.14x at 50%
// and 0.82x at 61%.
constexpr int64_t kSparseRowsL1Bytes = 28 * 1024;

// Whether rows of C channels (A_T's rows Cp long) at `density` non-zero
// read more of A_T than stays in L1 (see kSparseRowsL1Bytes).
template <typename T>
bool rows_outgrow_l1(double density, int64_t C, int64_t Cp) {
  const double bytes = static_cast<double>(C * Cp * static_cast<int64_t>(sizeof(T)));
  return density * bytes > static_cast<double>(kSparseRowsL1Bytes);
}

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
// by b's mean): run_sparse_rows, 64 channels 1.16x the dense kernel at 49%
// non-zero, 1.01x at 60%, 0.92x at 70%; 128 channels 1.14x at 50%, 0.82x at
// 61%, 0.68x at 71% (more of A_T's rows to keep in L1); run_sparse_blocks,
// 144 channels 1.12x at 50%, 0.95x at 62%; 256 channels 1.27x at 50%,
// 1.07x at 62%, 0.93x at 73%; 1,024 channels 1.23x, 1.04x, 0.91x.
template <typename T>
double sparse_max_density(int64_t C, int64_t Cp) {
  const int64_t bytes = C * Cp * static_cast<int64_t>(sizeof(T));
  if (bytes <= 32 * 1024) {
    return 0.58;
  }
  return bytes > kSparseMaxBytes && C >= 192 ? 0.6 : 0.54;
}

// The non-zero entries of y[0, C) (NaN counts as non-zero, -0 as zero): their
// offsets in A_T (j * Cp, Cp the length of A_T's rows: a slice's width in
// run_sparse_blocks) to off[0, n) and their values to val[0, n);
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

// What a sparse driver's tasks add up: non-zero entries of y over the
// entries seen, and the statistics' first and last changes.
template <typename T>
struct SparseTally {
  std::atomic<int64_t> nonzero{0}, entries{0};
  T first = 0, last = 0;
  std::mutex mutex;

  void add(int64_t task_nonzero, int64_t task_entries, T task_first, T task_last) {
    nonzero += task_nonzero;
    entries += task_entries;
    const std::lock_guard<std::mutex> lock(mutex);
    first = nan_max(first, task_first);
    last = nan_max(last, task_last);
  }

  // Counts the rows run, folds the changes into `stats` (if any) and returns
  // the share of non-zero entries.
  double finish(int64_t rows, LoopStats<T>* stats, int64_t K) {
    count_sparse_rows(rows);
    if (stats) {
      stats->measured_part(first, last, K);
    }
    const int64_t n = entries.load();
    return n > 0 ? static_cast<double>(nonzero.load()) / static_cast<double>(n) : 0.0;
  }
};

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
  SparseTally<T> tally;
  // The first iteration from which every rate has the same bits: a row may
  // stop at a fixed point only from there on.
  int64_t steady = 0;
  if (rates != nullptr && K > 0) {
    steady = K - 1;
    while (steady > 0 && std::memcmp(rates + steady - 1, rates + K - 1, sizeof(T)) == 0) {
      --steady;
    }
  }
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
    tally.add(my_nonzero, my_entries, my_first, my_last);
  });
  return tally.finish(rows, stats, K);
}

// The sparse rows for more channels (A_T past kSparseMaxBytes): a block of
// rows runs its iterations together, and its mixing goes by slices of A_T's
// columns (kSparseSliceVecs vectors of output channels) and, within a
// slice, by blocks of A_T's rows that fit L1 (kSparseSliceBytes): every row
// of the block sums its non-zeros that fall in that part of A_T while it
// stays in L1, two rows at a time (2 x kSparseSliceVecs sums in flight). A
// row's sums still run over its non-zero list in ascending order from +0
// (kept between the blocks of A_T's rows), so the values are those of the
// dense chain, as in run_sparse_rows. At half density (1 thread, 4,096 rows)
// AVX-512 runs 144 channels 1.12x as fast as the dense kernel, 160-512
// 1.18-1.28x, 1,024 1.2x; AVX2 (on the same core) 1.16-1.22x from 192 to
// 512. Measured on a 32 KiB L1 and 1 MiB L2: slices of 2 vectors reached
// 1.19x at 256 channels, 8 vectors 1.24x, 4 vectors 1.28x; L1 blocks of
// 16 / 32 / 64 KiB 1.24x / 1.28x / 1.13x.
constexpr int kSparseSliceVecs = 4;
constexpr int64_t kSparseSliceBytes = 32 * 1024;

// More channels than this: a slice of A_T (C x 4 vectors) outgrows L2 and
// the blocks shrink to a few rows (AVX-512, 1 thread, half density: 1,024
// channels 1.24x the dense kernel, 2,048 0.88x, 4,096 0.13x).
constexpr int64_t kSparseMaxChannels = 1024;

// A for run_sparse_blocks: [slice][j][i] = A[slice * SW + i, j] (A_T's
// columns cut into slices of SW output channels, each slice's rows
// contiguous), zero past C.
template <typename T>
at::Tensor sliced_A(const at::Tensor& A, int64_t SW) {
  const int64_t C = A.size(0), Cs = round_up(C, SW);
  at::Tensor padded = at::zeros({Cs, C}, A.options());
  padded.narrow(0, 0, C).copy_(A);
  return padded.view({Cs / SW, SW, C}).transpose(1, 2).contiguous();
}

template <typename T>
double run_sparse_blocks(
    const T* y0, const T* b, T* out, int64_t C, const T* As, int64_t begin, int64_t end,
    int64_t K, const T* rates, T lr, const VecProjection<T>& project, LoopStats<T>* stats,
    InterruptPoll& poll) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t SW = kSparseSliceVecs * W;
  // Cw: C rounded up to the vector width, Cs to the slice width.
  const int64_t Cw = round_up(C, W), Cs = round_up(C, SW), slices = Cs / SW;
  // Rows of A_T per L1 block of a slice, and the blocks.
  const int64_t KB = std::max<int64_t>(1, kSparseSliceBytes / (SW * static_cast<int64_t>(sizeof(T))));
  const int64_t nkb = (C + KB - 1) / KB;
  // Rows per block: their y, update, b, lists and sums in about 320 KiB,
  // which stay in L2 beside the slice of A_T in use (from 16 rows on, which
  // rows share a block of A_T changed little: 256 channels, 2-vector slices,
  // 32 KiB blocks, 64 rows 1.18x, 32 1.16x, 16 1.15x).
  const int64_t per_row = (5 * Cs + 2 * W + SW) * static_cast<int64_t>(sizeof(T)) + (nkb + 1) * 8;
  // Even: a lone last row of an odd block still has a partner's room in
  // `part` (its sums there go unused).
  const int64_t R = std::clamp<int64_t>(320 * 1024 / per_row / 2 * 2, 2, 64);
  SparseTally<T> tally;
  const int64_t rows = std::max<int64_t>(end - begin, 0);
  for_tiles(rows, R, [&](auto&& grab) {
    const int64_t L = Cs + W;  // a list's room
    std::vector<T> store;
    std::vector<int32_t> off_store;
    T* const base = aligned_in(store, R * (3 * Cs + L + SW));
    T* y = base;
    T* yn = y + R * Cs;
    T* bb = yn + R * Cs;
    T* val = bb + R * Cs;
    T* part = val + R * L;
    int32_t* const off = aligned_in(off_store, R * L);
    std::vector<int64_t> bounds(static_cast<size_t>(R * (nkb + 1)));
    int64_t my_nonzero = 0, my_entries = 0;
    T my_first = 0, my_last = 0;
    int64_t r0, r1;
    const auto run = [&](auto shrink) {
      constexpr bool SH = decltype(shrink)::value;
      while (!poll.stop() && grab(r0, r1)) {
        const int64_t n = r1 - r0;
        // From base: y and yn may have swapped in the previous block.
        y = base;
        yn = y + R * Cs;
        std::fill(base, base + 3 * R * Cs, T(0));
        for (int64_t r = 0; r < n; ++r) {
          std::memcpy(y + r * Cs, y0 + (begin + r0 + r) * C, static_cast<size_t>(C) * sizeof(T));
          std::memcpy(bb + r * Cs, b + (begin + r0 + r) * C, static_cast<size_t>(C) * sizeof(T));
        }
        for (int64_t k = 0; k < K; ++k) {
          const Vec neg_lr(-(rates ? rates[k] : lr));
          const bool delta = stats && (k == 0 || k == K - 1);
          for (int64_t r = 0; r < n; ++r) {
            int32_t* o = off + r * L;
            const int64_t cnt = nonzeros(y + r * Cs, C, SW, o, val + r * L);
            my_nonzero += cnt;
            int64_t* bd = bounds.data() + r * (nkb + 1);
            bd[0] = 0;
            for (int64_t q = 1; q < nkb; ++q) {
              bd[q] = std::lower_bound(o + bd[q - 1], o + cnt, static_cast<int32_t>(q * KB * SW)) - o;
            }
            bd[nkb] = cnt;
          }
          my_entries += n * C;
          Vec dmax(static_cast<T>(0));
          // One slice of NV vectors of output channels: NV = kSparseSliceVecs
          // but in the last slice, which ends with the last vector below C.
          // Out of line: inlined four times into this loop, GCC spilled the
          // sums' pointers and ran 256 channels 1.14x instead of 1.28x the
          // dense kernel.
          const auto slice = [&](auto nv_c, int64_t sl) __attribute__((noinline)) {
            constexpr int NV = decltype(nv_c)::value;
            const T* a_sl = As + sl * C * SW;
            for (int64_t q = 0; q < nkb; ++q) {
              const bool last = q == nkb - 1;
              // Two rows at a time: 2 NV independent sums in flight.
              for (int64_t r = 0; r < n; r += 2) {
                const bool two = r + 1 < n;
                const int64_t partner = two ? r + 1 : r;
                const int64_t* bd0 = bounds.data() + r * (nkb + 1);
                const int64_t* bd1 = bounds.data() + partner * (nkb + 1);
                const int32_t* o0 = off + r * L;
                const int32_t* o1 = off + partner * L;
                const T* v0 = val + r * L;
                const T* v1 = val + partner * L;
                Vec acc0[NV], acc1[NV];
                TORCHITER_UNROLL
                for (int v = 0; v < NV; ++v) {
                  acc0[v] = q == 0 ? Vec(static_cast<T>(0)) : Vec::loadu(part + r * SW + v * W);
                  acc1[v] = q == 0 ? Vec(static_cast<T>(0)) : Vec::loadu(part + (r + 1) * SW + v * W);
                }
                int64_t t0 = bd0[q], t1 = two ? bd1[q] : bd1[q + 1];
                const int64_t e0 = bd0[q + 1], e1 = bd1[q + 1];
                for (; t0 < e0 && t1 < e1; ++t0, ++t1) {
                  const Vec x0(v0[t0]);
                  const Vec x1(v1[t1]);
                  const T* p0 = a_sl + o0[t0];
                  const T* p1 = a_sl + o1[t1];
                  TORCHITER_UNROLL
                  for (int v = 0; v < NV; ++v) {
                    acc0[v] = at::vec::fmadd(Vec::loadu(p0 + v * W), x0, acc0[v]);
                    acc1[v] = at::vec::fmadd(Vec::loadu(p1 + v * W), x1, acc1[v]);
                  }
                }
                for (; t0 < e0; ++t0) {
                  const Vec x0(v0[t0]);
                  const T* p0 = a_sl + o0[t0];
                  TORCHITER_UNROLL
                  for (int v = 0; v < NV; ++v) {
                    acc0[v] = at::vec::fmadd(Vec::loadu(p0 + v * W), x0, acc0[v]);
                  }
                }
                for (; t1 < e1; ++t1) {
                  const Vec x1(v1[t1]);
                  const T* p1 = a_sl + o1[t1];
                  TORCHITER_UNROLL
                  for (int v = 0; v < NV; ++v) {
                    acc1[v] = at::vec::fmadd(Vec::loadu(p1 + v * W), x1, acc1[v]);
                  }
                }
                if (!last) {
                  TORCHITER_UNROLL
                  for (int v = 0; v < NV; ++v) {
                    acc0[v].store(part + r * SW + v * W);
                    acc1[v].store(part + (r + 1) * SW + v * W);
                  }
                  continue;
                }
                // The update of this slice's channels (next_value, as every
                // other path), into yn.
                const auto finish = [&](const Vec* a, int64_t row) __attribute__((always_inline)) {
                  TORCHITER_UNROLL
                  for (int v = 0; v < NV; ++v) {
                    const int64_t at = sl * SW + v * W;
                    const int64_t cell = row * Cs + at;
                    const Vec old = Vec::loadu(y + cell);
                    const Vec nv = next_value<SH>(project, a[v], Vec::loadu(bb + cell), old, neg_lr);
                    nv.store(yn + cell);
                    if (delta) {
                      dmax = max_change(dmax, masked_delta(nv, old, C - at));
                    }
                  }
                };
                finish(acc0, r);
                if (two) {
                  finish(acc1, r + 1);
                }
              }
            }
          };
          static_assert(kSparseSliceVecs == 4, "the last slice's widths below");
          for (int64_t sl = 0; sl < slices; ++sl) {
            switch (std::min<int64_t>(kSparseSliceVecs, (Cw - sl * SW) / W)) {
              case 1:
                slice(std::integral_constant<int, 1>{}, sl);
                break;
              case 2:
                slice(std::integral_constant<int, 2>{}, sl);
                break;
              case 3:
                slice(std::integral_constant<int, 3>{}, sl);
                break;
              default:
                slice(std::integral_constant<int, 4>{}, sl);
                break;
            }
          }
          std::swap(y, yn);
          if (delta) {
            if (k == 0) {
              my_first = nan_max(my_first, lane_max(dmax));
            }
            if (k == K - 1) {
              my_last = nan_max(my_last, lane_max(dmax));
            }
          }
          if (poll.stop()) {
            return;
          }
        }
        for (int64_t r = 0; r < n; ++r) {
          std::memcpy(out + (begin + r0 + r) * C, y + r * Cs, static_cast<size_t>(C) * sizeof(T));
        }
      }
    };
    project.use_shrink ? run(std::true_type{}) : run(std::false_type{});
    tally.add(my_nonzero, my_entries, my_first, my_last);
  });
  count_sparse_blocks(rows);
  return tally.finish(rows, stats, K);
}

} // namespace
} // namespace torchiter::cpu::CPU_CAPABILITY
