// CUDA kernel of torchiter.quadratic_descent: the whole projected-gradient loop
// y <- project(y - lr_k (A y - b)) in one call.
//
// Positions (sample, spatial index) are independent: A only mixes channels.
// Three paths, picked on the host:
//
// 1. Blocked (tol == 0, C <= 64): ONE launch for the whole loop. Each thread
//    owns one position; its C values of y and b sit in shared memory (a
//    column per thread, so accesses are conflict-free) and A (transposed,
//    rows padded to CMAX) is broadcast from shared memory with 16-byte loads.
//    The thread runs all max_iterations there and writes y once: global
//    memory sees one read of y0 and b and one write of y in total, and there
//    is no launch or host round trip per iteration. This is the fastest
//    design for small C, where a per-iteration GEMM would be launch- and
//    bandwidth-bound, and needs no host synchronisation at all. Float64 at
//    33 <= C <= 64 would need 1 KiB of shared memory per position there
//    (32-thread blocks, 3-4 warps per SM); it splits each position over four
//    threads instead, which keep y and b in registers (split kernel below).
// 2. Fused sweeps (tol > 0, C <= 64): one launch per iteration over a
//    (C, B*S) working layout (positions contiguous, coalesced for any S).
//    Each thread computes the C x C mixing for its position, writes y_next
//    and, on check iterations only, folds max |y_k - y_{k-1}| into a device
//    scalar (atomicMax on the bit pattern, NaN mapped to +inf so it never
//    passes the test). The host reads that scalar (one sync) on check
//    iterations only, i.e. every check_every iterations.
// 3. Large C (> 64): per iteration A·y by cuBLAS (at::mm_out into a
//    preallocated buffer) and one fused update/projection/delta kernel.
//
// The per-element arithmetic is that of the CPU kernel: acc_i = sum_j A_ij y_j
// accumulated with one FMA per term from j = 0, grad = acc - b,
// v = fma(grad, -lr_k, y), then the shared projection (device_math.cuh). Path
// 3 accumulates in cuBLAS's order, equal to float rounding only, and in
// float32 it runs in TF32 where PyTorch's settings allow TF32 matmuls
// (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision). The
// iteration count is returned as a 0-dim int64 tensor on the device, written
// by a fill kernel (no sync) with the count the host decided.
//
// The rates: lr, or a CPU lrs read on the host (LearningRates; path 1 copies
// them through pinned memory without a sync), or an lrs on the device, which
// the kernels read there (cast to T once per call and checked
// asynchronously: an invalid rate fails a device-side assert, raised at a
// later CUDA call, after which the CUDA context is unusable).
#include "../ops.h"
#include "device_math.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace torchiter {
namespace {

using cuda::DeviceProjection;
using cuda::fma_rn;
using cuda::Pack;
using cuda::vec16;

constexpr int kMaxSmallC = 64;
constexpr int kStepThreads = 256;
constexpr int kBlockedThreads = 128;
constexpr size_t kDefaultSmem = 48 * 1024;
// Threads per position in the split kernel, and the positions of one warp.
constexpr int kSplit = 4;
constexpr int kSplitPositionsPerWarp = 32 / kSplit;

// Element strides of a (batch, channel, spatial) view: position q = b * S + s.
struct BatchChannelSpatialStrides {
  int64_t sB, sC, sS;
};

__device__ __forceinline__ int64_t position_offset(const BatchChannelSpatialStrides& l, int64_t q, int64_t S) {
  return (q / S) * l.sB + (q % S) * l.sS;
}

// At[j * CMAX + i] = A[i][j], zero for i >= C: row j of At holds column j of
// A, padded so each row starts 16-byte aligned.
template <typename T, int CMAX>
__device__ __forceinline__ void load_transposed_A(T* At, const T* __restrict__ A, int C) {
  for (int idx = threadIdx.x; idx < C * CMAX; idx += blockDim.x) {
    const int j = idx / CMAX;
    const int i = idx % CMAX;
    At[idx] = i < C ? A[i * C + j] : T(0);
  }
}

// acc[i] = sum_j A[i][j] * y(j), one FMA per term from j = 0 upward (the CPU
// kernel's order), for i < C; entries i >= C are scratch.
template <typename T, int CMAX, typename LoadY>
__device__ __forceinline__ void mix_channels(T (&acc)[CMAX], const T* At, int C, LoadY load_y) {
  constexpr int V = vec16<T>();
  static_assert(CMAX % V == 0, "CMAX must be a multiple of the vector width");
  using VecT = Pack<T, V>;
#pragma unroll
  for (int i = 0; i < CMAX; ++i) {
    acc[i] = T(0);
  }
  for (int j = 0; j < C; ++j) {
    const T yj = load_y(j);
    const VecT* row = reinterpret_cast<const VecT*>(At + j * CMAX);
#pragma unroll
    for (int i0 = 0; i0 < CMAX; i0 += V) {
      if (i0 < C) {
        const VecT a = row[i0 / V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          acc[i0 + e] = fma_rn(a.v[e], yj, acc[i0 + e]);
        }
      }
    }
  }
}

// |d| as an order-preserving unsigned bit pattern; NaN becomes +inf so that a
// diverged loop never passes `max < tol`.
__device__ __forceinline__ unsigned long long delta_bits(float d) {
  d = fabsf(d);
  return d != d ? 0x7f800000ull : static_cast<unsigned long long>(__float_as_uint(d));
}
__device__ __forceinline__ unsigned long long delta_bits(double d) {
  d = fabs(d);
  return d != d ? 0x7ff0000000000000ull : static_cast<unsigned long long>(__double_as_longlong(d));
}

template <typename T>
T delta_from_bits(unsigned long long bits) {
  if constexpr (std::is_same_v<T, float>) {
    const auto u = static_cast<uint32_t>(bits);
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  } else {
    double d;
    std::memcpy(&d, &bits, sizeof d);
    return d;
  }
}

// Warp max then one atomic per warp. Every thread of the block must call it
// (blockDim.x is a multiple of 32).
__device__ __forceinline__ void atomic_max_delta(unsigned long long bits, unsigned long long* dmax) {
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, bits, o);
    bits = other > bits ? other : bits;
  }
  if ((threadIdx.x & 31) == 0 && bits != 0) {
    atomicMax(dmax, bits);
  }
}

// Path 1: all K iterations for one position per thread.
template <typename T, int CMAX>
__global__ void __launch_bounds__(kBlockedThreads) quadratic_descent_blocked_kernel(
    const T* __restrict__ A, const T* __restrict__ y0, BatchChannelSpatialStrides ly,
    const T* __restrict__ b, BatchChannelSpatialStrides lb, T* __restrict__ out, int C, int64_t S,
    int64_t P, int64_t K, const T* __restrict__ lrs, T lr, DeviceProjection<T> proj) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nt = blockDim.x;
  const int t = threadIdx.x;
  T* At = reinterpret_cast<T*>(smem_raw);
  T* ys = At + C * CMAX; // channel c of this block's thread t at ys[c * nt + t]
  T* bs = ys + C * nt;
  load_transposed_A<T, CMAX>(At, A, C);
  const int64_t q = static_cast<int64_t>(blockIdx.x) * nt + t;
  const bool active = q < P;
  if (active) {
    const int64_t oy = position_offset(ly, q, S);
    const int64_t ob = position_offset(lb, q, S);
    for (int c = 0; c < C; ++c) {
      ys[c * nt + t] = y0[oy + c * ly.sC];
      bs[c * nt + t] = b[ob + c * lb.sC];
    }
  }
  __syncthreads();
  if (!active) {
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    const T neg_lr = -(lrs ? lrs[k] : lr);
    T acc[CMAX];
    mix_channels<T, CMAX>(acc, At, C, [&](int j) { return ys[j * nt + t]; });
    // Every read of this thread's old y is done: update its column in place.
#pragma unroll
    for (int i = 0; i < CMAX; ++i) {
      if (i < C) {
        T& yi = ys[i * nt + t];
        yi = proj(fma_rn(acc[i] - bs[i * nt + t], neg_lr, yi));
      }
    }
  }
  // The output is contiguous (B, C, S).
  const int64_t oo = (q / S) * C * S + (q % S);
  for (int c = 0; c < C; ++c) {
    out[oo + c * S] = ys[c * nt + t];
  }
}

// Path 1, split: all K iterations for one position per kSplit threads. Lane
// `slot + part * kSplitPositionsPerWarp` of a warp holds channels
// [part * W, part * W + W) of the warp's position `slot` (y, b and their
// accumulators in registers) and gets the other parts' y by shuffles; only A
// is in shared memory. Each quarter-warp has one part, so its 16-byte loads
// of A read one address (a broadcast). The sums run over j = 0..C-1 in order
// with one FMA per term, as mix_channels and the CPU kernel do.
template <typename T, int CMAX>
__global__ void __launch_bounds__(kBlockedThreads) quadratic_descent_split_kernel(
    const T* __restrict__ A, const T* __restrict__ y0, BatchChannelSpatialStrides ly,
    const T* __restrict__ b, BatchChannelSpatialStrides lb, T* __restrict__ out, int C, int64_t S,
    int64_t P, int64_t K, const T* __restrict__ lrs, T lr, DeviceProjection<T> proj) {
  constexpr int W = CMAX / kSplit;
  constexpr int V = vec16<T>();
  static_assert(CMAX % kSplit == 0 && W % V == 0, "each part must be whole vectors of A");
  using VecT = Pack<T, V>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* At = reinterpret_cast<T*>(smem_raw);
  load_transposed_A<T, CMAX>(At, A, C);
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int part = lane / kSplitPositionsPerWarp;
  const int slot = lane % kSplitPositionsPerWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t q0 = warp * kSplitPositionsPerWarp;
  // Whole warps past the end leave together (no lane waits at a shuffle for
  // them); the idle lanes of the last warp run on zeros and store nothing.
  if (q0 >= P) {
    return;
  }
  const int64_t q = q0 + slot;
  const bool active = q < P;
  const int c0 = part * W;
  const int64_t oy = active ? position_offset(ly, q, S) : 0;
  const int64_t ob = active ? position_offset(lb, q, S) : 0;
  T yv[W];
  T bv[W];
#pragma unroll
  for (int e = 0; e < W; ++e) {
    const bool mine = active && c0 + e < C;
    yv[e] = mine ? y0[oy + (c0 + e) * ly.sC] : T(0);
    bv[e] = mine ? b[ob + (c0 + e) * lb.sC] : T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    const T neg_lr = -(lrs ? lrs[k] : lr);
    T acc[W];
#pragma unroll
    for (int e = 0; e < W; ++e) {
      acc[e] = T(0);
    }
#pragma unroll
    for (int src = 0; src < kSplit; ++src) {
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const int j = src * W + e;
        // C is the same for the whole warp: all lanes shuffle, or none.
        if (j < C) {
          const T yj = __shfl_sync(0xffffffffu, yv[e], src * kSplitPositionsPerWarp + slot);
          const VecT* row = reinterpret_cast<const VecT*>(At + j * CMAX + c0);
#pragma unroll
          for (int i0 = 0; i0 < W; i0 += V) {
            const VecT a = row[i0 / V];
#pragma unroll
            for (int v = 0; v < V; ++v) {
              acc[i0 + v] = fma_rn(a.v[v], yj, acc[i0 + v]);
            }
          }
        }
      }
    }
    // Every lane's shuffles of this iteration have read the old y.
#pragma unroll
    for (int e = 0; e < W; ++e) {
      if (c0 + e < C) {
        yv[e] = proj(fma_rn(acc[e] - bv[e], neg_lr, yv[e]));
      }
    }
  }
  if (!active) {
    return;
  }
  // The output is contiguous (B, C, S).
  const int64_t oo = (q / S) * C * S + (q % S);
#pragma unroll
  for (int e = 0; e < W; ++e) {
    if (c0 + e < C) {
      out[oo + (c0 + e) * S] = yv[e];
    }
  }
}

// Path 2: one iteration over the (C, P) working layout.
template <typename T, int CMAX>
__global__ void __launch_bounds__(kStepThreads) quadratic_descent_step_kernel(
    const T* __restrict__ A, const T* __restrict__ y, const T* __restrict__ b,
    T* __restrict__ yn, int C, int64_t P, T neg_lr, const T* __restrict__ lr_k,
    DeviceProjection<T> proj, unsigned long long* dmax) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* At = reinterpret_cast<T*>(smem_raw);
  load_transposed_A<T, CMAX>(At, A, C);
  __syncthreads();
  if (lr_k) {
    neg_lr = -*lr_k;
  }
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned long long dm = 0;
  if (q < P) {
    T acc[CMAX];
    mix_channels<T, CMAX>(acc, At, C, [&](int j) { return y[j * P + q]; });
#pragma unroll
    for (int i = 0; i < CMAX; ++i) {
      if (i < C) {
        const T old = y[i * P + q];
        const T v = proj(fma_rn(acc[i] - b[i * P + q], neg_lr, old));
        yn[i * P + q] = v;
        if (dmax) {
          const unsigned long long d = delta_bits(v - old);
          dm = d > dm ? d : dm;
        }
      }
    }
  }
  if (dmax) {
    atomic_max_delta(dm, dmax);
  }
}

// Path 3: the update after a cuBLAS A·y, elementwise over the (C, P) layout.
template <typename T>
__global__ void __launch_bounds__(kStepThreads) quadratic_descent_update_kernel(
    const T* __restrict__ ay, const T* __restrict__ y, const T* __restrict__ b,
    T* __restrict__ yn, int64_t n, T neg_lr, const T* __restrict__ lr_k,
    DeviceProjection<T> proj, unsigned long long* dmax) {
  if (lr_k) {
    neg_lr = -*lr_k;
  }
  unsigned long long dm = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const T old = y[i];
    const T v = proj(fma_rn(ay[i] - b[i], neg_lr, old));
    yn[i] = v;
    if (dmax) {
      const unsigned long long d = delta_bits(v - old);
      dm = d > dm ? d : dm;
    }
  }
  if (dmax) {
    atomic_max_delta(dm, dmax);
  }
}

// Calls f(std::integral_constant<int, CMAX>) with the smallest CMAX >= C.
template <typename F>
void with_cmax(int64_t C, F&& f) {
  if (C <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (C <= 8) {
    f(std::integral_constant<int, 8>{});
  } else if (C <= 16) {
    f(std::integral_constant<int, 16>{});
  } else if (C <= 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 64>{});
  }
}

int64_t blocks_for(int64_t n, int threads) {
  return (n + threads - 1) / threads;
}

BatchChannelSpatialStrides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// The rates of one call as the kernels take them: `host` gives lr_k on the
// host (lr, or a CPU lrs), unless `device` holds the K rates as T on y's
// device, where the kernels read them.
struct Rates {
  LearningRates& host;
  at::Tensor device;
};

// Path 1. Returns false (nothing launched) when its shared memory does not
// fit the device, so that the caller takes path 2.
template <typename T>
bool run_blocked(
    const at::Tensor& y3, const at::Tensor& A, const at::Tensor& b3,
    at::Tensor& out, const QuadraticDescentArgs& args,
    Rates& rates, cudaStream_t stream) {
  const int64_t B = y3.size(0);
  const int C = static_cast<int>(y3.size(1));
  const int64_t S = y3.size(2);
  const int64_t P = B * S;
  const int64_t K = args.max_iterations;
  const auto proj = DeviceProjection<T>::make(args.shrink, args.min, args.max);
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  // The K rates on the device, or an undefined tensor for a constant lr.
  // Host rates are cast to T on the host (as the CPU kernel does) and reach
  // the device through pinned memory without a sync.
  const auto device_rates = [&]() -> at::Tensor {
    if (rates.device.defined() || !rates.host.scheduled()) {
      return rates.device;
    }
    at::Tensor h = at::empty(
        {K}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value).pinned_memory(true));
    T* hp = h.data_ptr<T>();
    for (int64_t k = 0; k < K; ++k) {
      hp[k] = static_cast<T>(rates.host.at(k));
    }
    return h.to(y3.options(), /*non_blocking=*/true);
  };
  bool launched = false;
  with_cmax(C, [&](auto cmax) {
    constexpr int CMAX = decltype(cmax)::value;
    // Float64 from 33 channels: the split kernel, with only A in shared
    // memory (at most 32 KiB), so its blocks keep kBlockedThreads threads.
    constexpr bool split = std::is_same_v<T, double> && CMAX == kMaxSmallC;
    const auto kernel = [] {
      if constexpr (split) {
        return &quadratic_descent_split_kernel<T, CMAX>;
      } else {
        return &quadratic_descent_blocked_kernel<T, CMAX>;
      }
    }();
    int nt = kBlockedThreads;
    auto smem = [&](int threads) {
      return static_cast<size_t>(C) * (split ? CMAX : CMAX + 2 * threads) * sizeof(T);
    };
    while (smem(nt) > kDefaultSmem && nt > 32) {
      nt /= 2;
    }
    if (smem(nt) > kDefaultSmem) {
      if (smem(nt) > prop->sharedMemPerBlockOptin) {
        return;
      }
      C10_CUDA_CHECK(cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem(nt))));
    }
    const int positions_per_block = split ? nt / kSplit : nt;
    const at::Tensor lrs_dev = device_rates();
    kernel<<<static_cast<unsigned>(blocks_for(P, positions_per_block)), nt, smem(nt), stream>>>(
        A.const_data_ptr<T>(), y3.const_data_ptr<T>(), strides_of(y3),
        b3.const_data_ptr<T>(), strides_of(b3), out.data_ptr<T>(), C, S, P, K,
        lrs_dev.defined() ? lrs_dev.const_data_ptr<T>() : nullptr,
        static_cast<T>(args.lr), proj);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  return launched;
}

// Paths 2 and 3. Returns the iteration count; `out` receives the result.
template <typename T>
int64_t run_sweeps(
    const at::Tensor& y3, const at::Tensor& A, const at::Tensor& b3,
    at::Tensor& out, const QuadraticDescentArgs& args,
    Rates& rates, cudaStream_t stream) {
  const int64_t B = y3.size(0);
  const int64_t C = y3.size(1);
  const int64_t S = y3.size(2);
  const int64_t P = B * S;
  const int64_t K = args.max_iterations;
  const auto proj = DeviceProjection<T>::make(args.shrink, args.min, args.max);
  const bool stop_test = args.tol > 0;

  // (C, P) working copies: channel-major, positions contiguous.
  auto to_working = [&](const at::Tensor& t3) {
    at::Tensor w = at::empty({C, P}, t3.options());
    w.view({C, B, S}).copy_(t3.permute({1, 0, 2}));
    return w;
  };
  at::Tensor y = to_working(y3);
  const at::Tensor bw = to_working(b3);
  at::Tensor yn = at::empty_like(y);
  at::Tensor ay;
  if (C > kMaxSmallC) {
    ay = at::empty_like(y);
  }
  at::Tensor dmax_slot;
  unsigned long long* dmax_ptr = nullptr;
  if (stop_test) {
    dmax_slot = at::empty({1}, y3.options().dtype(at::kLong));
    dmax_ptr = reinterpret_cast<unsigned long long*>(dmax_slot.data_ptr<int64_t>());
  }
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const T* device_lrs = rates.device.defined() ? rates.device.const_data_ptr<T>() : nullptr;

  int64_t iterations = K;
  for (int64_t k = 0; k < K; ++k) {
    const bool check = stop_test && k >= 1 && k % args.check_every == 0;
    // A device rate is read by the kernel; a host one travels as an argument.
    const T* lr_k = device_lrs ? device_lrs + k : nullptr;
    const T neg_lr = lr_k ? T(0) : -static_cast<T>(rates.host.at(k));
    unsigned long long* dmax = check ? dmax_ptr : nullptr;
    if (check) {
      C10_CUDA_CHECK(cudaMemsetAsync(dmax, 0, sizeof(unsigned long long), stream));
    }
    if (C <= kMaxSmallC) {
      with_cmax(C, [&](auto cmax) {
        constexpr int CMAX = decltype(cmax)::value;
        const size_t smem = static_cast<size_t>(C) * CMAX * sizeof(T);
        quadratic_descent_step_kernel<T, CMAX>
            <<<static_cast<unsigned>(blocks_for(P, kStepThreads)), kStepThreads, smem, stream>>>(
                A.const_data_ptr<T>(), y.const_data_ptr<T>(), bw.const_data_ptr<T>(),
                yn.data_ptr<T>(), static_cast<int>(C), P, neg_lr, lr_k, proj, dmax);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      at::mm_out(ay, A, y);
      const int64_t n = C * P;
      const int64_t grid = std::min<int64_t>(blocks_for(n, kStepThreads), 8 * sms);
      quadratic_descent_update_kernel<T><<<static_cast<unsigned>(grid), kStepThreads, 0, stream>>>(
          ay.const_data_ptr<T>(), y.const_data_ptr<T>(), bw.const_data_ptr<T>(),
          yn.data_ptr<T>(), n, neg_lr, lr_k, proj, dmax);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    std::swap(y, yn);
    if (check) {
      // The only host synchronisation of the loop, once per check.
      unsigned long long bits = 0;
      c10::cuda::memcpy_and_sync(&bits, dmax, sizeof bits, cudaMemcpyDeviceToHost, stream);
      // NaN arrives as +inf: inf < tol is false, so it never converges.
      if (delta_from_bits<T>(bits) < static_cast<T>(args.tol)) {
        iterations = k + 1;
        break;
      }
    }
  }
  out.view({B, C, S}).copy_(y.view({C, B, S}).permute({1, 0, 2}));
  return iterations;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> run(
    const at::Tensor& y0, const at::Tensor& A_in, const at::Tensor& b_in,
    const QuadraticDescentArgs& args, Rates& rates) {
  const auto [B, C, S] = batch_channel_spatial(y0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // (B, C, S) views of the inputs (copies only where the spatial dims do not
  // merge); they are only read.
  const at::Tensor y3 = y0.reshape({B, C, S});
  const at::Tensor b3 = b_in.reshape({B, C, S});
  const at::Tensor A = A_in.contiguous();
  at::Tensor out = at::empty(y0.sizes(), y0.options().memory_format(at::MemoryFormat::Contiguous));
  int64_t iterations = args.max_iterations;
  const bool blocked = C <= kMaxSmallC && args.tol == 0 &&
      run_blocked<T>(y3, A, b3, out, args, rates, stream);
  if (!blocked) {
    iterations = run_sweeps<T>(y3, A, b3, out, args, rates, stream);
  }
  return {out, at::scalar_tensor(iterations, y0.options().dtype(at::kLong))};
}

bool on_device(const std::optional<at::Tensor>& lrs) {
  return lrs.has_value() && lrs->defined() && !lrs->device().is_cpu();
}

// On CUDA the first max_iterations rates are all checked when the call
// starts, also those an early stop leaves unused (the CPU kernel checks a
// rate when the loop reaches it). A CPU lrs is checked here, where reading
// it is free and the error names the rate (the ex driver's plain calls see
// slices of it, which would name it by its index in the slice). A device
// lrs is checked without reading it on the host: an invalid rate fails a
// device-side assert, raised at a later CUDA call (at the latest the next
// synchronisation), after which the process's CUDA context is unusable (as
// with sgd_step_'s device lr).
void check_rates(const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  if (!lrs.has_value() || !lrs->defined() || args.max_iterations == 0) {
    return;
  }
  if (lrs->device().is_cpu()) {
    LearningRates all(lrs, args);
    for (int64_t k = 0; k < args.max_iterations; ++k) {
      static_cast<void>(all.at(k));
    }
    return;
  }
  const at::Tensor l = lrs->detach().narrow(0, 0, args.max_iterations);
  at::_assert_async(
      at::isfinite(l).logical_and(l.ge(0)).all(),
      std::string(args.stats ? "torchiter.quadratic_descent_ex" : "torchiter.quadratic_descent") +
          ": lrs must hold finite numbers >= 0");
}

// quadratic_descent on checked inputs and rates (check_rates): the plain loop
// of the quadratic_descent_ex driver, which checks once per call.
std::tuple<at::Tensor, at::Tensor> quadratic_descent_cuda_checked(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  const c10::cuda::CUDAGuard guard(y0.device());
  const bool device_rates = on_device(lrs);
  // CPU rates are read on the host in blocks as the loop reaches them,
  // without a device synchronisation.
  LearningRates host_lrs(device_rates ? std::optional<at::Tensor>() : lrs, args);
  const at::Tensor y0d = y0.detach();
  if (y0.numel() == 0 || args.max_iterations == 0) {
    return {y0d.clone(at::MemoryFormat::Contiguous),
            at::scalar_tensor(args.max_iterations, y0.options().dtype(at::kLong))};
  }
  return AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "torchiter.quadratic_descent", [&] {
    Rates rates{host_lrs, at::Tensor()};
    if (device_rates) {
      // A device cast (a no-op when the driver already made them T).
      rates.device = lrs->detach().narrow(0, 0, args.max_iterations).to(y0.scalar_type()).contiguous();
    }
    return run<scalar_t>(y0d, A.detach(), b.detach(), args, rates);
  });
}

// The argument checks of both ops' CUDA kernels (the rates' values aside:
// check_rates, under the device guard).
void check_cuda_call(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  check_quadratic_descent(y0, A, b, lrs, args, kLoopDtypes);
  TORCH_CHECK(
      y0.is_cuda(), args.stats ? "torchiter.quadratic_descent_ex" : "torchiter.quadratic_descent",
      ": the CUDA kernel got y0 on ", y0.device());
}

std::tuple<at::Tensor, at::Tensor> quadratic_descent_cuda(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  check_cuda_call(y0, A, b, lrs, args);
  const c10::cuda::CUDAGuard guard(y0.device());
  check_rates(lrs, args);
  if (is_reduced_float(y0.scalar_type())) {
    return with_float32_loop(y0.detach(), A.detach(), b.detach(), [&](const auto& y, const auto& a, const auto& c) {
      return quadratic_descent_cuda_checked(y, a, c, lrs, args);
    });
  }
  return quadratic_descent_cuda_checked(y0, A, b, lrs, args);
}

// quadratic_descent_ex: the device-generic driver (../quadratic_descent_ex.cpp)
// around the kernels above. Its measured iterations are single launches of
// path 1 and its stop tests read one value per test, as path 2 does.
QuadraticDescentResult quadratic_descent_ex_cuda(
    const at::Tensor& y0, const at::Tensor& A, const at::Tensor& b,
    const std::optional<at::Tensor>& lrs, const QuadraticDescentArgs& args) {
  check_cuda_call(y0, A, b, lrs, args);
  const c10::cuda::CUDAGuard guard(y0.device());
  check_rates(lrs, args);
  if (is_reduced_float(y0.scalar_type())) {
    return with_float32_loop_ex(y0.detach(), A.detach(), b.detach(), [&](const auto& y, const auto& a, const auto& c) {
      return quadratic_descent_ex_cuda(y, a, c, lrs, args);
    });
  }
  // Device rates are cast to y's dtype once per call, not by each of the
  // driver's plain calls.
  std::optional<at::Tensor> rates = lrs;
  if (on_device(lrs) && args.max_iterations > 0) {
    rates = lrs->detach().narrow(0, 0, args.max_iterations).to(y0.scalar_type()).contiguous();
  }
  return quadratic_descent_ex_generic(
      y0.detach(), A.detach(), b.detach(), rates, args, &quadratic_descent_cuda_checked);
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, CUDA, m) {
  m.impl("quadratic_descent", &quadratic_descent_entry<&quadratic_descent_cuda>);
  m.impl("quadratic_descent_ex", &quadratic_descent_ex_entry<&quadratic_descent_ex_cuda>);
}

} // namespace torchiter
