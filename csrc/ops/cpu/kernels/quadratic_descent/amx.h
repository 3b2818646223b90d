// Channel mixing on AMX tiles (TDPBF16PS): the bfloat16 path of steps.h on
// CPUs with AMX-BF16, where one tile instruction does 16 x 16 x 32
// multiply-adds, eight times VDPBF16PS's work per core and cycle.
//
// The product is the one VDPBF16PS computes, in the same layout: A rounded
// to bfloat16 in pairs of channels (one 32-bit word per pair, the even
// channel in the low half) and y packed the same way per position, which is
// exactly the "VNNI" layout TDPBF16PS reads its second operand in. A block of
// 32 channels x 32 positions takes four accumulator tiles (tmm0-3), two tiles
// of A (tmm4-5) and two of packed y (tmm6-7); its update, projection and
// change are done from a 4 KiB buffer while it is still in L1, so y is read
// and written once per iteration as on the other paths.
//
// The tile code runs in one of two ways, picked once per process (amx_mode):
// on the hardware, or, for tests on any CPU with AVX512-BF16, on an emulation
// of the eight tile registers that checks the tile configuration and operand
// shapes the way the hardware's #UD would and computes TDPBF16PS's sums in
// its order. Both run the same kernel code (step_columns_amx is a template
// on the tile operations). On the hardware, the process first asks Linux for
// the tile state (arch_prctl ARCH_REQ_XCOMP_PERM) and checks the instructions
// once in a child process against the emulation; anything unexpected leaves
// the mixing on VDPBF16PS.
//
// Part of the CPU quadratic_descent kernel: included by columns.h; holds
// code in the AVX-512 variant only.
#pragma once

#include "../../../interrupt.h"
#include "steps.h"

#if defined(TORCHITER_BF16_MIXING) && defined(__linux__) && defined(__x86_64__)
#define TORCHITER_AMX_MIXING 1

#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <vector>

#define TORCHITER_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

enum class AmxMode { kOff, kHardware, kEmulated };

// Channels and positions of one block: two tiles of 16 each way.
constexpr int64_t kAmxBlock = 32;
// Pairs of channels per tile of A (64 bytes a row).
constexpr int64_t kAmxPairs = 16;

// The 64-byte operand of LDTILECFG (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// Every tile the kernel uses is 16 rows of 64 bytes: tmm0-3 16 x 16 float32
// sums, tmm4-5 16 channels x 16 pairs of A, tmm6-7 16 pairs x 16 positions.
inline TileConfig kernel_tile_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  return c;
}

// The tile instructions themselves. GCC's _tile_* macros take the register
// number as a literal token, hence one branch per register.
struct AmxHardware {
  // GCC's macros tell the compiler of no memory that LDTILECFG and
  // TILELOADD read (its LDTILECFG names 8 of the 64 bytes): a compiler
  // barrier makes every earlier store (the config, the packed y) happen
  // first. TILESTORED's macro has its own.
  TORCHITER_AMX_TARGET static void configure(const TileConfig& c) {
    __asm__ volatile("" ::: "memory");
    _tile_loadconfig(&c);
  }
  TORCHITER_AMX_TARGET static void release() {
    _tile_release();
  }
  template <int N>
  TORCHITER_AMX_TARGET static void zero() {
    static_assert(N >= 0 && N < 4, "accumulators are tmm0-3");
    if constexpr (N == 0) _tile_zero(0);
    else if constexpr (N == 1) _tile_zero(1);
    else if constexpr (N == 2) _tile_zero(2);
    else _tile_zero(3);
  }
  template <int N>
  TORCHITER_AMX_TARGET static void load(const void* base, int64_t stride) {
    static_assert(N >= 4 && N < 8, "operands are tmm4-7");
    __asm__ volatile("" ::: "memory");
    if constexpr (N == 4) _tile_loadd(4, base, stride);
    else if constexpr (N == 5) _tile_loadd(5, base, stride);
    else if constexpr (N == 6) _tile_loadd(6, base, stride);
    else _tile_loadd(7, base, stride);
  }
  template <int N>
  TORCHITER_AMX_TARGET static void store(void* base, int64_t stride) {
    static_assert(N >= 0 && N < 4, "accumulators are tmm0-3");
    if constexpr (N == 0) _tile_stored(0, base, stride);
    else if constexpr (N == 1) _tile_stored(1, base, stride);
    else if constexpr (N == 2) _tile_stored(2, base, stride);
    else _tile_stored(3, base, stride);
  }
  // tmm[D] += tmm[A] . tmm[B] for the block's four (A, B) pairs.
  template <int D, int A, int B>
  TORCHITER_AMX_TARGET static void dot() {
    if constexpr (D == 0 && A == 4 && B == 6) _tile_dpbf16ps(0, 4, 6);
    else if constexpr (D == 1 && A == 4 && B == 7) _tile_dpbf16ps(1, 4, 7);
    else if constexpr (D == 2 && A == 5 && B == 6) _tile_dpbf16ps(2, 5, 6);
    else {
      static_assert(D == 3 && A == 5 && B == 7, "the block uses four (A, B) pairs");
      _tile_dpbf16ps(3, 5, 7);
    }
  }
};

// The same operations on a software copy of the tile registers, per thread
// as the hardware's are. Uses the configuration as the hardware does (rows
// and bytes per row of each tile) and fails where the hardware would fault:
// an unconfigured or mis-shaped tile, a load or store wider than configured.
struct AmxEmulated {
  struct State {
    bool configured = false;
    TileConfig config;
    alignas(64) uint8_t tiles[8][16][64];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  static void fault_unless(bool ok, const char* what) {
    if (!ok) {
      kernel_error(what);
    }
  }
  static void check_tile(int n) {
    const State& s = state();
    fault_unless(s.configured, "torchiter: emulated AMX: tile instruction without LDTILECFG");
    fault_unless(
        n >= 0 && n < 8 && s.config.rows[n] > 0 && s.config.rows[n] <= 16 && s.config.colsb[n] > 0 &&
            s.config.colsb[n] <= 64,
        "torchiter: emulated AMX: a tile register used is not configured");
  }
  static void configure(const TileConfig& c) {
    fault_unless(c.palette == 1 && c.start_row == 0, "torchiter: emulated AMX: palette must be 1, start_row 0");
    for (uint8_t r : c.reserved) {
      fault_unless(r == 0, "torchiter: emulated AMX: reserved bytes of the tile config must be zero");
    }
    for (int t = 8; t < 16; ++t) {
      fault_unless(c.rows[t] == 0 && c.colsb[t] == 0, "torchiter: emulated AMX: palette 1 has 8 tiles");
    }
    for (int t = 0; t < 8; ++t) {
      fault_unless(
          (c.rows[t] == 0) == (c.colsb[t] == 0) && c.rows[t] <= 16 && c.colsb[t] <= 64,
          "torchiter: emulated AMX: a tile's rows and bytes per row must both be 0 or within 16 x 64");
    }
    State& s = state();
    s.config = c;
    s.configured = true;
    std::memset(s.tiles, 0, sizeof s.tiles);
  }
  static void release() {
    state().configured = false;
  }
  template <int N>
  static void zero() {
    check_tile(N);
    std::memset(state().tiles[N], 0, sizeof state().tiles[N]);
  }
  template <int N>
  static void load(const void* base, int64_t stride) {
    check_tile(N);
    State& s = state();
    const auto* p = static_cast<const uint8_t*>(base);
    std::memset(s.tiles[N], 0, sizeof s.tiles[N]);
    for (int r = 0; r < s.config.rows[N]; ++r) {
      std::memcpy(s.tiles[N][r], p + r * stride, s.config.colsb[N]);
    }
  }
  template <int N>
  static void store(void* base, int64_t stride) {
    check_tile(N);
    const State& s = state();
    auto* p = static_cast<uint8_t*>(base);
    for (int r = 0; r < s.config.rows[N]; ++r) {
      std::memcpy(p + r * stride, s.tiles[N][r], s.config.colsb[N]);
    }
  }
  static float bf16_to_float(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  // TDPBF16PS: for each row m and float32 column n of D, add A's row m
  // times B's column n pair by pair (the even element first), as the
  // Intrinsics Guide's reference code orders it. The SDM's pseudo-code
  // groups the sums differently (even and odd partial sums, added at the
  // end, with denormals flushed), so the hardware's last bits may differ
  // from this model's; tests hold the hardware to a tolerance.
  template <int D, int A, int B>
  static void dot() {
    static_assert(D != A && D != B && A != B, "TDPBF16PS needs three distinct tiles");
    check_tile(D), check_tile(A), check_tile(B);
    State& s = state();
    const TileConfig& c = s.config;
    fault_unless(
        c.rows[A] == c.rows[D] && c.colsb[A] == c.rows[B] * 4 && c.colsb[B] == c.colsb[D] &&
            c.colsb[D] % 4 == 0,
        "torchiter: emulated AMX: TDPBF16PS operand shapes do not match");
    for (int m = 0; m < c.rows[D]; ++m) {
      for (int n = 0; n < c.colsb[D] / 4; ++n) {
        float acc;
        std::memcpy(&acc, &s.tiles[D][m][4 * n], sizeof acc);
        for (int k = 0; k < c.colsb[A] / 4; ++k) {
          uint16_t a[2], b[2];
          std::memcpy(a, &s.tiles[A][m][4 * k], sizeof a);
          std::memcpy(b, &s.tiles[B][k][4 * n], sizeof b);
          acc += bf16_to_float(a[0]) * bf16_to_float(b[0]);
          acc += bf16_to_float(a[1]) * bf16_to_float(b[1]);
        }
        std::memcpy(&s.tiles[D][m][4 * n], &acc, sizeof acc);
      }
    }
  }
};

// The sums G = A y of the block of 32 channels from row i0 and 32 positions
// from column s0 into g (32 x 32 floats, rows 32 apart). At holds A's pairs
// (rows of `tp` words, a multiple of 16, zero past the real pairs and
// channels), yp the packed y (`tp` rows of `yld` words, zero past them).
template <typename Tiles>
TORCHITER_AMX_TARGET inline void amx_block(
    const uint32_t* At, int64_t tp, const uint32_t* yp, int64_t yld, int64_t i0, int64_t s0, float* g) {
  Tiles::template zero<0>();
  Tiles::template zero<1>();
  Tiles::template zero<2>();
  Tiles::template zero<3>();
  const int64_t a_stride = tp * 4, y_stride = yld * 4;
  for (int64_t k = 0; k < tp; k += kAmxPairs) {
    Tiles::template load<4>(At + i0 * tp + k, a_stride);
    Tiles::template load<5>(At + (i0 + 16) * tp + k, a_stride);
    Tiles::template load<6>(yp + k * yld + s0, y_stride);
    Tiles::template load<7>(yp + k * yld + s0 + 16, y_stride);
    Tiles::template dot<0, 4, 6>();
    Tiles::template dot<1, 4, 7>();
    Tiles::template dot<2, 5, 6>();
    Tiles::template dot<3, 5, 7>();
  }
  constexpr int64_t g_stride = kAmxBlock * 4;
  Tiles::template store<0>(g, g_stride);
  Tiles::template store<1>(g + 16, g_stride);
  Tiles::template store<2>(g + 16 * kAmxBlock, g_stride);
  Tiles::template store<3>(g + 16 * kAmxBlock + 16, g_stride);
}

// Has this CPU AMX-TILE and AMX-BF16, and does the OS save their state?
inline bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) {  // OSXSAVE
    return false;
  }
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) {
    return false;
  }
  uint32_t xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  (void)xcr0_hi;
  return (xcr0_lo & (3u << 17)) == (3u << 17);  // XTILECFG and XTILEDATA
}

// Linux hands out the 8 KiB tile state only to processes that ask for it
// (once per process; every thread may then use the tiles).
inline bool request_amx_permission() {
  constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXtileData) != 0) {
    return false;
  }
  unsigned long granted = 0;
  return syscall(SYS_arch_prctl, kArchGetXcompPerm, &granted) == 0 && ((granted >> kXtileData) & 1);
}

// The block of sums for small integer inputs (exact in bfloat16 and in any
// float32 summation order), on the given tile operations.
template <typename Tiles>
TORCHITER_AMX_TARGET void amx_probe_sums(const uint32_t* At, const uint32_t* yp, float* g) {
  const TileConfig cfg = kernel_tile_config();
  Tiles::configure(cfg);
  amx_block<Tiles>(At, 2 * kAmxPairs, yp, kAmxBlock, 0, 0, g);
  Tiles::release();
}

// Runs the tile instructions once in a child process and compares their
// sums with the emulation's: a fault or a wrong answer there leaves this
// process on VDPBF16PS instead of crashing it or giving wrong results. The
// child is a bare clone (no fork handlers) that only computes into memory
// it owns a copy of and exits.
inline bool amx_self_test() {
  constexpr int64_t tp = 2 * kAmxPairs;  // 64 channels
  std::vector<uint32_t> At(kAmxBlock * tp), yp(tp * kAmxBlock);
  const auto small = [](int64_t i, int k) {
    // bfloat16 bits of a small integer in [-3, 3], varying along rows,
    // columns and the two halves of a pair.
    const float v = static_cast<float>(static_cast<int>((i * 5 + i / 13 + k * 3) % 7) - 3);
    return bf16_bits(v);
  };
  for (int64_t i = 0; i < static_cast<int64_t>(At.size()); ++i) {
    At[i] = small(i, 0) | (small(i, 1) << 16);
    yp[i] = small(i, 2) | (small(i, 5) << 16);
  }
  std::vector<float> want(kAmxBlock * kAmxBlock), got(kAmxBlock * kAmxBlock, -1.0f);
  amx_probe_sums<AmxEmulated>(At.data(), yp.data(), want.data());
  // Every signal blocked across the clone: until the child has reset them,
  // the parent's handlers (Python's, which write to a descriptor the child
  // shares) must not run in it. A fault in the tile code is still
  // delivered (the kernel unblocks a synchronous SIGILL or SIGSEGV), with
  // the default action.
  sigset_t all, before;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &before);
  // Exit signal 0 and __WCLONE below: no SIGCHLD for this child, so neither
  // an ignored SIGCHLD nor another thread's waitpid(-1) can reap it first.
  const long pid = syscall(SYS_clone, 0, 0, 0, 0, 0);
  if (pid == 0) {
    // A fault must end the child quietly: default actions (not Python's
    // faulthandler, which would print a traceback) and no core file of the
    // whole process.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    for (int sig : {SIGILL, SIGSEGV, SIGBUS, SIGFPE}) {
      sigaction(sig, &dfl, nullptr);
    }
    const struct rlimit no_core {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    amx_probe_sums<AmxHardware>(At.data(), yp.data(), got.data());
    syscall(SYS_exit_group, std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0 ? 0 : 3);
  }
  pthread_sigmask(SIG_SETMASK, &before, nullptr);
  if (pid < 0) {
    return false;
  }
  int status = 0;
  while (waitpid(static_cast<pid_t>(pid), &status, __WCLONE) < 0) {
    if (errno != EINTR) {
      return false;
    }
  }
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// How the bfloat16 mixing uses AMX in this process, decided once: the
// environment variable TORCHITER_AMX (amx_request) may say 0 (never),
// emulate (the emulation, on any CPU with AVX512-BF16: for tests), force
// (the self-test on the hardware even where CPUID denies AMX: a test of
// the fallback) or 1 / auto (the default: the hardware where present and
// working).
inline AmxMode amx_mode() {
  static const AmxMode mode = [] {
    const AmxRequest want = amx_request();
    if (want == AmxRequest::kOff || !cpu_has_avx512_bf16()) {
      return AmxMode::kOff;
    }
    if (want == AmxRequest::kEmulate) {
      return AmxMode::kEmulated;
    }
    const bool granted = cpu_has_amx_bf16() && request_amx_permission();
    if (!granted && want != AmxRequest::kForce) {
      return AmxMode::kOff;
    }
    if (!amx_self_test()) {
      kernel_warning_once(
          "torchiter: the AMX tile self-test failed; "
          "bfloat16 channel mixing uses AVX512-BF16 instead");
      return AmxMode::kOff;
    }
    return AmxMode::kHardware;
  }();
  return mode;
}


// The AMX layout of A's pairs (ChannelMixing::A_tiles): `rows` = C rounded
// up to 32 rows of `tp` = ceil(C / 2) rounded up to 16 words, zero-padded.
inline std::vector<uint32_t> amx_pairs_of(const float* a, int64_t C, int64_t& tp) {
  tp = round_up((C + 1) / 2, kAmxPairs);
  return bf16_pair_rows(a, C, tp, round_up(C, kAmxBlock));
}

// One thread's run of steps under one tile configuration: the first
// session on a thread configures the tiles (LDTILECFG), the last to end
// releases them (TILERELEASE, also on an exception), so that a thread's
// share of a loop pays for them once instead of once per step. The loop
// drivers open one per worker; step_columns_amx opens its own, which
// configures where no driver did, and again where the thread has run the
// interrupt check since (Python signal handlers may have run other tile
// code, oneDNN's, which sets its own configuration and releases it).
struct AmxThreadState {
  int depth = 0;
  uint64_t checks = 0;  // interrupt_checks_on_this_thread() when configured
};

inline AmxThreadState& amx_thread() {
  thread_local AmxThreadState state;
  return state;
}

class AmxSession {
 public:
  template <typename T>
  explicit AmxSession(const ChannelMixing<T>& mix) {
    if constexpr (std::is_same_v<T, float>) {
      if (mix.A_tiles) {
        emulated_ = mix.amx_emulated;
        AmxThreadState& t = amx_thread();
        const uint64_t checks = interrupt_checks_on_this_thread();
        if (t.depth == 0 || t.checks != checks) {
          emulated_ ? AmxEmulated::configure(kernel_tile_config()) : AmxHardware::configure(kernel_tile_config());
          t.checks = checks;
        }
        // Counted once configured: a configuration that throws leaves
        // the thread as it was.
        ++t.depth;
        held_ = true;
      }
    }
  }
  ~AmxSession() {
    if (held_ && --amx_thread().depth == 0) {
      emulated_ ? AmxEmulated::release() : AmxHardware::release();
    }
  }
  AmxSession(const AmxSession&) = delete;
  AmxSession& operator=(const AmxSession&) = delete;

 private:
  bool held_ = false;
  bool emulated_ = false;
};

// step_columns on AMX tiles: packs the block (C x n, n a multiple of 16)
// into pairs with zero padding to whole tiles, then for each block of 32
// channels x 32 positions the tile sums and, from them, the update of those
// rows (next_value, as every path). With DELTA, sink(s, deltas) gets each
// vector of 16 positions' max |new - old| over the channels.
template <typename Tiles, bool DELTA, typename Sink>
TORCHITER_AMX_TARGET void step_columns_amx(
    const ChannelMixing<float>& pn, const float* y, const float* b, float* yn, int64_t ld, int64_t n,
    int64_t valid, float lr, Sink&& sink) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = 16;
  const int64_t C = pn.C, tp = pn.tile_pairs, P = (C + 1) / 2;
  const int64_t yld = round_up(n, kAmxBlock);
  const int64_t rows = round_up(C, kAmxBlock);
  thread_local std::vector<uint32_t> packed;
  thread_local std::vector<float> changes;
  if (packed.size() < static_cast<size_t>(tp * yld)) {
    packed.resize(static_cast<size_t>(tp * yld));
  }
  if (changes.size() < static_cast<size_t>(n)) {
    changes.resize(static_cast<size_t>(n));
  }
  uint32_t* yp = packed.data();
  pack_pairs(y, ld, C, n, yp, yld);
  // Zeros where the tiles reach past the data: the columns past n of every
  // pair row, and whole pair rows past the last one (their A words are zero,
  // but 0 * garbage could be NaN).
  for (int64_t p = 0; p < P; ++p) {
    std::fill(yp + p * yld + n, yp + (p + 1) * yld, 0u);
  }
  std::fill(yp + P * yld, yp + tp * yld, 0u);
  if constexpr (DELTA) {
    std::fill(changes.data(), changes.data() + n, 0.0f);
  }
  const VecProjection<float> project = *pn.project;
  const Vec neg_lr(-lr);
  alignas(64) float g[kAmxBlock * kAmxBlock];
  const auto run = [&](auto shrink) {
    for (int64_t i0 = 0; i0 < rows; i0 += kAmxBlock) {
      const int64_t r_end = std::min(kAmxBlock, C - i0);
      for (int64_t s0 = 0; s0 < n; s0 += kAmxBlock) {
        amx_block<Tiles>(pn.A_tiles, tp, yp, yld, i0, s0, g);
        for (int64_t v = 0; v < 2 && s0 + v * W < n; ++v) {
          const int64_t s = s0 + v * W;
          Vec dmax(0.0f);
          for (int64_t r = 0; r < r_end; ++r) {
            update_vector<decltype(shrink)::value, DELTA>(
                project, Vec::loadu(g + r * kAmxBlock + v * W), y, b, yn, (i0 + r) * ld + s, neg_lr, valid - s,
                dmax);
          }
          if constexpr (DELTA) {
            max_change(Vec::loadu(changes.data() + s), dmax).store(changes.data() + s);
          }
        }
      }
    }
  };
  {
    const AmxSession session(pn);
    project.use_shrink ? run(std::true_type{}) : run(std::false_type{});
  }
  if constexpr (DELTA) {
    for (int64_t s = 0; s < n; s += W) {
      const ColumnDeltas<float, 1> d{Vec::loadu(changes.data() + s)};
      sink(s, d);
    }
  }
}

} // namespace
} // namespace torchiter::cpu::CPU_CAPABILITY

#else

namespace torchiter::cpu::CPU_CAPABILITY {
namespace {

// Without the AMX path a session holds nothing.
class AmxSession {
 public:
  template <typename T>
  explicit AmxSession(const ChannelMixing<T>&) {}
};

} // namespace
} // namespace torchiter::cpu::CPU_CAPABILITY
#endif
