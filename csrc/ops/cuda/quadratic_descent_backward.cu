// CUDA kernel of torchiter.quadratic_descent_backward: the device-generic
// backward (../autograd/quadratic_descent.cpp) with solves that never wait on
// the host.
//
// With the default linalg backend, ATen's batched LU (linalg_solve_ex on a
// stack of matrices) goes to MAGMA for stacks of more than 16 channels
// (beyond 16 systems, or beyond one above 128 channels), and MAGMA's batched
// getrf synchronises the device with the host.
// The per-row systems therefore go to cuBLAS's batched getrf/getrs directly,
// enqueued on the current stream. The one shared system of the unprojected
// case stays with linalg_solve_ex on a contiguous matrix: ATen then factors
// one matrix with cuSOLVER and solves with the adjoint, a path without MAGMA.
//
// As on the CPU, a singular active block is not detected here (reading the
// solvers' status would wait for the device): it gives non-finite gradients.
#include "../ops.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDABlas.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace torchiter {
namespace {

constexpr const char* kBackwardOp = "torchiter.quadratic_descent_backward";

at::Tensor solve_shared_cuda(const at::Tensor& At, const at::Tensor& rhs) {
  // A contiguous At makes linalg_solve_ex factor At^T with cuSOLVER and solve
  // with the adjoint; a transposed view would take the non-adjoint solve,
  // which for C <= 8 and 256 to 1024 right-hand sides is MAGMA's.
  return std::get<0>(at::linalg_solve_ex(
      At.contiguous(), rhs, /*left=*/true, /*check_errors=*/false));
}

// The device addresses of t[0], t[1], ... (t contiguous, first dim the batch)
// as cuBLAS's batched routines take them, made on the device.
at::Tensor batch_pointers(const at::Tensor& t) {
  const int64_t base = static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr()));
  const int64_t step = t.stride(0) * static_cast<int64_t>(t.element_size());
  return at::arange(base, base + t.size(0) * step, step, t.options().dtype(at::kLong));
}

template <typename T>
at::Tensor solve_per_row_cublas(const at::Tensor& M, const at::Tensor& rhs) {
  const int64_t k = M.size(0);
  TORCH_CHECK(
      k <= std::numeric_limits<int>::max() && M.size(1) <= std::numeric_limits<int>::max(),
      kBackwardOp, ": ", k, " systems of ", M.size(1), " channels exceed cuBLAS's int sizes");
  const int n = static_cast<int>(M.size(1));
  const int batch = static_cast<int>(k);
  // Row-major M is M^T to column-major cuBLAS: factor that in place and
  // solve with its transpose, M x = r.
  TORCH_INTERNAL_ASSERT(M.is_contiguous());
  at::Tensor x = rhs.clone(at::MemoryFormat::Contiguous);
  const auto int_opts = M.options().dtype(at::kInt);
  at::Tensor pivots = at::empty({k, M.size(1)}, int_opts);
  at::Tensor infos = at::empty({k}, int_opts);
  const at::Tensor m_ptrs = batch_pointers(M);
  const at::Tensor x_ptrs = batch_pointers(x);
  auto** m_array = reinterpret_cast<T**>(m_ptrs.data_ptr<int64_t>());
  auto** x_array = reinterpret_cast<T**>(x_ptrs.data_ptr<int64_t>());
  at::cuda::blas::getrfBatched<T>(n, m_array, n, pivots.data_ptr<int>(), infos.data_ptr<int>(), batch);
  // cuBLAS reports only invalid arguments here, on the host, without a sync.
  int arg_info = 0;
  at::cuda::blas::getrsBatched<T>(
      at::cuda::getCurrentCUDABlasHandle(), CUBLAS_OP_T, n, /*nrhs=*/1, m_array, n,
      pivots.data_ptr<int>(), x_array, n, &arg_info, batch);
  TORCH_CHECK(arg_info == 0, kBackwardOp, ": cuBLAS getrsBatched rejected argument ", -arg_info);
  return x;
}

at::Tensor solve_per_row_cuda(const at::Tensor& M, const at::Tensor& rhs, int64_t /*first_row*/) {
  return AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "torchiter.quadratic_descent_backward", [&] {
    return solve_per_row_cublas<scalar_t>(M, rhs);
  });
}

std::tuple<at::Tensor, at::Tensor> quadratic_descent_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& A,
    double shrink, std::optional<double> min, std::optional<double> max) {
  // Checked before the guard, which needs y on a CUDA device.
  check_quadratic_descent_backward(grad_y, y, A, shrink, min, max);
  const c10::cuda::CUDAGuard guard(y.device());
  return quadratic_descent_backward_with(
      grad_y, y, A, shrink, min, max, ImplicitSolvers{&solve_shared_cuda, &solve_per_row_cuda});
}

} // namespace

TORCH_LIBRARY_IMPL(torchiter, CUDA, m) {
  m.impl("quadratic_descent_backward", &quadratic_descent_backward_cuda);
}

} // namespace torchiter
