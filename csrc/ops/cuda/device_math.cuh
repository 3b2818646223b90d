// Device-side per-element math of torchiter's ops: the scalar twin of
// ../cpu/kernels/vec_math.h. Same operations in the same order, with an FMA exactly
// where the CPU kernels call at::vec::fmadd; nvcc runs with --fmad=false (as
// the CPU build runs with -ffp-contract=off), so no other contraction happens
// and CPU and CUDA results agree to the last bit for float32/float64 inputs
// (up to how each rounds the bf16/f16 conversions, which are exact either way).
#pragma once

#include <cfloat>

#include "../ops.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

namespace torchiter {
namespace cuda {

__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  return __fmaf_rn(a, b, c);
}
__device__ __forceinline__ double fma_rn(double a, double b, double c) {
  return __fma_rn(a, b, c);
}

// A 16-byte (or narrower, for small T * N) register pack for vector memory
// accesses; only used on addresses aligned to sizeof(Pack).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__host__ __device__ constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

// The projection of both ops: soft threshold, then clamp to [lo, hi]. The
// comparisons replicate the at::vec ops of VecProjection bit for bit:
// clamp(v, -s, s) is min_ps(s, max_ps(-s, v)); clamp_min(v, lo) is
// max_ps(lo, v) = lo > v ? lo : v (v on ties, so max(-0., 0.) is -0., and v
// when v is NaN); clamp_max likewise.
template <typename T>
struct DeviceProjection {
  T shrink, neg_shrink, lo, hi;
  bool use_shrink, has_lo, has_hi;

  static DeviceProjection make(
      double s,
      const std::optional<double>& min,
      const std::optional<double>& max) {
    return DeviceProjection{
        static_cast<T>(s), static_cast<T>(-s),
        static_cast<T>(min.value_or(0)), static_cast<T>(max.value_or(0)),
        s > 0, min.has_value(), max.has_value()};
  }

  __device__ __forceinline__ T operator()(T v) const {
    if (use_shrink) {
      T c = neg_shrink > v ? neg_shrink : v; // NaN v stays NaN
      c = shrink < c ? shrink : c;
      v = v - c;
    }
    if (has_lo) {
      v = lo > v ? lo : v; // as max_ps(lo, v): v on ties and when NaN
    }
    if (has_hi) {
      v = hi < v ? hi : v; // as min_ps(hi, v)
    }
    return v;
  }
};

// The update of one element of torchiter.sgd_step_, in opmath type T.
template <typename T>
struct DeviceSgdMath {
  T neg_lr, momentum, one_minus_damp, wd;
  bool use_wd, use_mom, nesterov, maximize, first_step;
  DeviceProjection<T> project;
  // The Tensor-lr overload: lr (converted to float64 on the device) is read
  // by every thread instead of neg_lr, so nothing syncs with the host.
  const double* lr_ptr;

  static DeviceSgdMath make(const SgdOptions& o, const double* lr_ptr) {
    return DeviceSgdMath{
        static_cast<T>(-o.lr),
        static_cast<T>(o.momentum),
        static_cast<T>(1 - o.dampening),
        static_cast<T>(o.weight_decay),
        o.weight_decay != 0,
        o.momentum != 0,
        o.nesterov,
        o.maximize,
        o.first_step,
        DeviceProjection<T>::make(o.shrink, o.min, o.max),
        lr_ptr};
  }

  // -lr for this launch, as the CPU computes it: static_cast<T>(-lr).
  __device__ __forceinline__ T load_neg_lr() const {
    return lr_ptr ? static_cast<T>(-*lr_ptr) : neg_lr;
  }

  // False for a device lr that the CPU kernel would reject (negative, NaN or
  // infinite): the launch then writes nothing (the host is told
  // asynchronously, see sgd_step.cu).
  __device__ __forceinline__ bool lr_valid() const {
    return !lr_ptr || (*lr_ptr >= 0 && *lr_ptr <= DBL_MAX);
  }

  // Returns the new param; updates `buf` when momentum is on.
  __device__ __forceinline__ T operator()(T p, T g, T& buf, T nlr) const {
    if (maximize) {
      g = -g;
    }
    if (use_wd) {
      g = fma_rn(p, wd, g);
    }
    if (use_mom) {
      buf = first_step ? g : fma_rn(g, one_minus_damp, buf * momentum);
      g = nesterov ? fma_rn(buf, momentum, g) : buf;
    }
    return project(fma_rn(g, nlr, p));
  }
};

} // namespace cuda
} // namespace torchiter
