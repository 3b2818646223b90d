/* FMA throughput of one core: float32 GFLOP/s of back-to-back vector FMAs
 * with enough independent accumulators to hide their latency, so that only
 * the number of FMA units and the clock limit it. bench_threads.py compiles
 * this with the instruction set of the torchiter kernel variant in use and
 * runs one copy per thread.
 *
 *     cc -O2 -mavx2 -mfma fma_peak.c -o fma_peak && ./fma_peak avx2 1.0
 *     cc -O2 -mavx512f fma_peak.c -o fma_peak && ./fma_peak avx512 1.0
 *
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

#ifdef __AVX512F__
static long run_avx512(long trips) {
  __asm__ volatile("vxorps %%xmm30, %%xmm30, %%xmm30\n\tvxorps %%xmm31, %%xmm31, %%xmm31" ::: "xmm30", "xmm31");
  for (long i = 0; i < trips; i++) {
    __asm__ volatile(Z(0) Z(1) Z(2) Z(3) Z(4) Z(5) Z(6) Z(7) Z(8) Z(9) Z(10) Z(11) Z(16) Z(17) Z(18) Z(19)
                     ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
                         "xmm8", "xmm9", "xmm10", "xmm11", "xmm16", "xmm17", "xmm18", "xmm19");
  }
  return trips * 16L * 16 * 2;
}
#endif

int main(int argc, char** argv) {
  const char* isa = argc > 1 ? argv[1] : "avx2";
  const double seconds = argc > 2 ? atof(argv[2]) : 1.0;
  long (*run)(long) = run_avx2;
#ifdef __AVX512F__
  if (strcmp(isa, "avx512") == 0) run = run_avx512;
#else
  if (strcmp(isa, "avx512") == 0) {
    fprintf(stderr, "fma_peak: built without AVX-512\n");
    return 2;
  }
#endif
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
