/* FMA throughput of one core: float32 GFLOP/s of back-to-back vector FMAs
 * with enough independent accumulators to hide their latency, so that only
 * the number of FMA units and the clock limit it. bench_threads.py compiles
 * this with the instruction set of the torchiter kernel variant in use and
 * runs one copy per thread.
 *
 *     cc -O2 -mavx2 -mfma fma_peak.c -o fma_peak && ./fma_peak avx2 1.0
 *     cc -O2 -mavx512f fma_peak.c -o fma_peak && ./fma_peak avx512 1.0
 *
 *     cc -O2 -mavx512f -mavx512bf16 fma_peak.c -o fma_peak && ./fma_peak avx512bf16 1.0
 *
 * avx512bf16 times VDPBF16PS instead (bfloat16 pairs into float32, what the
 * kernels' bfloat16 mixing runs on): 16 lanes x 2 products x 2 FLOPs each.
 * Prints one line: "<isa> <GFLOP/s>". x86-64 only (GCC/Clang inline asm). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* 12 (ymm) or 16 (zmm) accumulators: more than latency x ports (4 x 2) on
 * any current core. */
#define Y(r) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #r "\n\t"
#define Z(r) "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #r "\n\t"

static long run_avx2(long trips) {
  __asm__ volatile("vxorps %%ymm14, %%ymm14, %%ymm14\n\tvxorps %%ymm15, %%ymm15, %%ymm15" ::: "xmm14", "xmm15");
  for (long i = 0; i < trips; i++) {
    __asm__ volatile(Y(0) Y(1) Y(2) Y(3) Y(4) Y(5) Y(6) Y(7) Y(8) Y(9) Y(10) Y(11)
                     ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
                         "xmm8", "xmm9", "xmm10", "xmm11");
  }
  return trips * 12L * 8 * 2;
}

/* Defines NAME(trips): `trips` rounds of 16 independent zmm instructions,
 * I(r) writing zmm r from zmm30 and zmm31; returns the FLOPs done, FLOPS
 * per instruction. */
#define RUN_ZMM(NAME, I, FLOPS)                                                                  \
  static long NAME(long trips) {                                                                 \
    __asm__ volatile("vxorps %%xmm30, %%xmm30, %%xmm30\n\tvxorps %%xmm31, %%xmm31, %%xmm31"     \
                     ::: "xmm30", "xmm31");                                                      \
    for (long i = 0; i < trips; i++) {                                                           \
      __asm__ volatile(I(0) I(1) I(2) I(3) I(4) I(5) I(6) I(7) I(8) I(9) I(10) I(11) I(16) I(17) \
                       I(18) I(19)                                                               \
                       ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",      \
                           "xmm8", "xmm9", "xmm10", "xmm11", "xmm16", "xmm17", "xmm18", "xmm19"); \
    }                                                                                            \
    return trips * 16L * (FLOPS);                                                                \
  }

/* A probe the build's flags leave out is NULL: main() says so. */
#ifdef __AVX512F__
RUN_ZMM(run_avx512, Z, 16 * 2)
#else
#define run_avx512 NULL
#endif

#ifdef __AVX512BF16__
#define B(r) "vdpbf16ps %%zmm30, %%zmm31, %%zmm" #r "\n\t"
RUN_ZMM(run_avx512bf16, B, 16 * 2 * 2)
#else
#define run_avx512bf16 NULL
#endif

int main(int argc, char** argv) {
  const char* isa = argc > 1 ? argv[1] : "avx2";
  const double seconds = argc > 2 ? atof(argv[2]) : 1.0;
  long (*run)(long) = NULL;
  if (strcmp(isa, "avx2") == 0) run = run_avx2;
  if (strcmp(isa, "avx512") == 0) run = run_avx512;
  if (strcmp(isa, "avx512bf16") == 0) run = run_avx512bf16;
  if (run == NULL) {
    fprintf(stderr, "fma_peak: no probe for %s in this build (the header of fma_peak.c gives the flags)\n", isa);
    return 2;
  }
  /* Warm up (clock ramp, wide-vector power state), then the best of a few
   * timed stretches. */
  run(20000000);
  double best = 0;
  for (int rep = 0; rep < 5; rep++) {
    long trips = 1000000, flops = 0;
    double t0 = now(), t;
    while ((t = now() - t0) < seconds / 5) flops += run(trips);
    if (flops / t > best) best = flops / t;
  }
  printf("%s %.1f\n", isa, best / 1e9);
  return 0;
}
