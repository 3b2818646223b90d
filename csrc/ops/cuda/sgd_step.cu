// CUDA kernels of torchiter.sgd_step_ (float lr and Tensor lr): one pass over
// memory, and one launch for many tensors of a dtype (multi-tensor apply).
//
// A launch carries, by value in its kernel arguments, the pointers and sizes
// of up to kMaxTensors tensors and, per tensor, the index of its first block.
// Each block updates one chunk of one tensor: it finds its tensor by a binary
// search over those first-block indices. Unlike PyTorch's multi_tensor_apply
// (a fixed table of 320 blocks per launch), the grid has as many blocks as
// the chunks of the listed tensors, so a single large tensor is one launch.
// Chunks are sized from the total work (4096 to 65536 elements) so that a
// list of a few million elements still spreads over every SM.
#include "../ops.h"
#include "../step_plan.h"
#include "device_math.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace torchiter {
namespace {

using cuda::DeviceSgdMath;
using cuda::Pack;
using cuda::vec16;

constexpr int kThreads = 256;
constexpr int kMaxTensors = 64;
constexpr int64_t kMinChunk = 4096; // a multiple of every vector width
constexpr int64_t kMaxChunk = 65536;
constexpr int64_t kMaxBlocksPerLaunch = int64_t{1} << 30;

// The tensors of one launch, passed by value (kept well under the 4 KiB
// kernel-argument limit of older toolkits).
struct TensorListArgs {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  void* buf[kMaxTensors]; // unused without momentum
  int64_t n[kMaxTensors];
  int32_t first_block[kMaxTensors + 1];
  int32_t count;
  int64_t chunk;
};
static_assert(
    sizeof(TensorListArgs) + sizeof(DeviceSgdMath<double>) < 4000,
    "kernel arguments must stay under 4 KiB");

template <typename T>
__device__ __forceinline__ bool aligned16(const T* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

template <typename scalar_t, bool kMomentum>
__global__ void __launch_bounds__(kThreads) sgd_multi_tensor_kernel(
    const TensorListArgs args,
    const DeviceSgdMath<at::opmath_type<scalar_t>> math) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int V = vec16<scalar_t>();
  using VecT = Pack<scalar_t, V>;

  // The tensor this block works on: the last one whose first block <= ours.
  const int blk = static_cast<int>(blockIdx.x);
  int lo = 0;
  int hi = args.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (args.first_block[mid] <= blk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t begin = static_cast<int64_t>(blk - args.first_block[lo]) * args.chunk;
  const int64_t n = std::min(args.chunk, args.n[lo] - begin);
  scalar_t* p = static_cast<scalar_t*>(args.p[lo]) + begin;
  const scalar_t* g = static_cast<const scalar_t*>(args.g[lo]) + begin;
  scalar_t* buf = kMomentum ? static_cast<scalar_t*>(args.buf[lo]) + begin : nullptr;
  if (!math.lr_valid()) {
    return; // an invalid device lr: nothing is written
  }
  const opmath_t neg_lr = math.load_neg_lr();

  int64_t tail = 0;
  if (aligned16(p) && aligned16(g) && (!kMomentum || aligned16(buf))) {
    // 16-byte loads and stores; chunk starts keep the tensor's alignment
    // because chunks are multiples of every vector width.
    const int64_t nv = n / V;
    for (int64_t i = threadIdx.x; i < nv; i += kThreads) {
      VecT pv = reinterpret_cast<const VecT*>(p)[i];
      const VecT gv = reinterpret_cast<const VecT*>(g)[i];
      VecT bv;
      if constexpr (kMomentum) {
        bv = reinterpret_cast<const VecT*>(buf)[i];
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        opmath_t b = kMomentum ? static_cast<opmath_t>(bv.v[e]) : opmath_t(0);
        pv.v[e] = static_cast<scalar_t>(math(
            static_cast<opmath_t>(pv.v[e]), static_cast<opmath_t>(gv.v[e]), b, neg_lr));
        if constexpr (kMomentum) {
          bv.v[e] = static_cast<scalar_t>(b);
        }
      }
      reinterpret_cast<VecT*>(p)[i] = pv;
      if constexpr (kMomentum) {
        reinterpret_cast<VecT*>(buf)[i] = bv;
      }
    }
    tail = nv * V;
  }
  // Unaligned chunks, and the last n % V elements of aligned ones.
  for (int64_t i = tail + threadIdx.x; i < n; i += kThreads) {
    opmath_t b = kMomentum ? static_cast<opmath_t>(buf[i]) : opmath_t(0);
    p[i] = static_cast<scalar_t>(
        math(static_cast<opmath_t>(p[i]), static_cast<opmath_t>(g[i]), b, neg_lr));
    if constexpr (kMomentum) {
      buf[i] = static_cast<scalar_t>(b);
    }
  }
}

// Chunk size for a launch series over `total` elements: the smallest power of
// two in [kMinChunk, kMaxChunk] that gives at most ~8 blocks per SM.
int64_t chunk_size(int64_t total) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target = total / (8 * std::max<int64_t>(sms, 1));
  int64_t c = kMinChunk;
  while (c < target && c < kMaxChunk) {
    c *= 2;
  }
  return c;
}

template <typename scalar_t>
void launch_segments(
    const std::vector<StepSegment>& segs,
    const SgdOptions& opt,
    const double* lr_ptr,
    cudaStream_t stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto math = DeviceSgdMath<opmath_t>::make(opt, lr_ptr);
  const bool momentum = opt.momentum != 0;
  int64_t total = 0;
  for (const StepSegment& s : segs) {
    total += s.numel;
  }
  TensorListArgs args;
  args.count = 0;
  args.chunk = chunk_size(total);
  int64_t blocks = 0;

  auto flush = [&] {
    if (args.count == 0) {
      return;
    }
    args.first_block[args.count] = static_cast<int32_t>(blocks);
    const dim3 grid(static_cast<unsigned>(blocks));
    if (momentum) {
      sgd_multi_tensor_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(args, math);
    } else {
      sgd_multi_tensor_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(args, math);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    args.count = 0;
    blocks = 0;
  };

  constexpr int64_t elem = sizeof(scalar_t);
  for (const StepSegment& s : segs) {
    // A tensor too large for one grid is cut into pieces of whole chunks.
    for (int64_t off = 0; off < s.numel;) {
      const int64_t piece = std::min(s.numel - off, kMaxBlocksPerLaunch * args.chunk);
      const int64_t nchunks = (piece + args.chunk - 1) / args.chunk;
      if (blocks + nchunks > kMaxBlocksPerLaunch) {
        flush();
      }
      const int i = args.count;
      args.p[i] = static_cast<char*>(s.param) + off * elem;
      args.g[i] = static_cast<const char*>(s.grad) + off * elem;
      args.buf[i] = s.buffer ? static_cast<char*>(s.buffer) + off * elem : nullptr;
      args.n[i] = piece;
      args.first_block[i] = static_cast<int32_t>(blocks);
      blocks += nchunks;
      ++args.count;
      if (args.count == kMaxTensors) {
        flush();
      }
      off += piece;
    }
  }
  flush();
}

void sgd_step_cuda_impl(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList bufs,
    const SgdOptions& opt,
    const at::Tensor* lr_tensor) {
  if (params.empty()) {
    return;
  }
  TORCH_CHECK(
      params[0].is_cuda(), "torchiter.sgd_step_: the CUDA kernel got tensors on ",
      params[0].device());
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The Tensor-lr overload reads lr on the device: converting it to float64
  // is a device-side copy (none when it already is float64), never a sync,
  // so the step can be captured in a CUDA graph and replayed with a new lr.
  at::Tensor lr64;
  if (lr_tensor) {
    lr64 = lr_tensor->detach().to(at::kDouble);
    // Checking lr's value on the host would synchronise; the kernels skip an
    // invalid lr and this assert raises at a later CUDA call (at the latest
    // the next synchronisation), leaving the CUDA context unusable.
    at::_assert_async(
        at::isfinite(lr64).logical_and(lr64.ge(0)),
        "torchiter.sgd_step_: lr must be a finite number >= 0");
  }
  const double* lr_ptr = lr_tensor ? lr64.const_data_ptr<double>() : nullptr;

  // Tensors that cannot be walked flat are updated in dense working copies
  // (in the same launch as the others) and written back through their own
  // strides afterwards, on the same stream.
  const StepPlan plan(params, grads, bufs, opt.momentum != 0);
  for (const auto& group : plan.groups()) {
    // A named reference, not a structured binding: lambdas capture those
    // only from C++20 on, and the build may be C++17.
    const std::vector<StepSegment>& segs = group.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, group.first, "torchiter.sgd_step_", [&] {
          launch_segments<scalar_t>(segs, opt, lr_ptr, stream);
        });
  }
  plan.write_back();
}

void sgd_step_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    double /*lr, in opt*/, const SgdOptions& opt) {
  check_sgd_step(params, grads, bufs, opt);
  sgd_step_cuda_impl(params, grads, bufs, opt, nullptr);
}

void sgd_step_tensor_lr_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    const at::Tensor& lr, const SgdOptions& opt) {
  // The value of lr stays on the device (reading it would synchronise the
  // stream and break graph capture), so only its shape, dtype and device are
  // checked; opt.lr is 0 in the option checks.
  check_sgd_lr_tensor(params, lr, /*check_value=*/false);
  check_sgd_step(params, grads, bufs, opt);
  sgd_step_cuda_impl(params, grads, bufs, opt, &lr);
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, CUDA, m) {
  m.impl("sgd_step_", &sgd_step_entry<double, &sgd_step_cuda>);
  m.impl("sgd_step_.tensor_lr", &sgd_step_entry<const at::Tensor&, &sgd_step_tensor_lr_cuda>);
}

} // namespace torchiter
