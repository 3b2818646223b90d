// The Python module torchiter._C. Importing it loads this library, whose
// static initialisers register the ops; it also holds one Python entry point
// for the per-iteration hot path. Kept apart from the op sources so the C++
// build (examples/cpp) links the ops without libpython.
#include "ops/cpu/capability.h"
#include "ops/interrupt.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

// One sgd_step_ without momentum, called through the dispatcher like
// torch.ops.torchiter.sgd_step_ (same kernels, checks, version counters), but
// without the generic torch.ops argument parsing, which costs more than the
// step itself on the small tensors of an inner loop (~1.8 us of ~2.6 us).
void sgd_step_no_momentum(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    double lr,
    double weight_decay,
    bool maximize,
    double shrink,
    std::optional<double> min,
    std::optional<double> max) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchiter::sgd_step_", "")
          .typed<void(
              at::TensorList, at::TensorList, at::TensorList, double, double,
              double, double, bool, bool, bool, double, std::optional<double>,
              std::optional<double>)>();
  // Like torch.optim's steps, the update is not recorded by autograd (the
  // iteration parameters it writes require grad).
  const at::NoGradGuard no_grad;
  op.call(
      params, grads, {}, lr, 0.0, 0.0, weight_decay, false, maximize, false,
      shrink, min, max);
}

// Python runs signal handlers on its main thread only; the whole-loop ops
// poll this from their calling thread (csrc/ops/interrupt.h).
std::thread::id g_python_main_thread;

// Runs the Python signal handlers that are due, as the interpreter would
// between bytecodes: after Ctrl-C, the default SIGINT handler raises
// KeyboardInterrupt, which travels out of the op as that Python exception.
void check_python_signals() {
  if (std::this_thread::get_id() != g_python_main_thread) {
    return;
  }
  const pybind11::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) {
    throw pybind11::error_already_set();
  }
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto threading = pybind11::module_::import("threading");
  if (threading.attr("current_thread")().is(threading.attr("main_thread")())) {
    g_python_main_thread = std::this_thread::get_id();
    torchiter::set_interrupt_check(&check_python_signals);
  }
  m.def(
      "cpu_capability",
      [] {
        return torchiter::cpu::capability_name(
            torchiter::cpu::cpu_kernels().capability);
      },
      "The instruction-set variant of the CPU kernels in use: 'avx512', "
      "'avx2' or 'default' (plain x86-64, or at::vec's portable code off "
      "x86). The widest one the CPU supports, unless the environment variable "
      "TORCHITER_CPU_CAPABILITY names a narrower one.");
  m.def(
      "cpu_bfloat16_units",
      [] {
        // A bad TORCHITER_AMX is an error here on every CPU, not only where
        // the kernels would read it.
        torchiter::cpu::amx_request();
        return std::string(torchiter::cpu::cpu_kernels().bf16_mixing_units());
      },
      "What the CPU kernels mix a bfloat16 loop's channels on (and a float32 "
      "loop's, under torch.set_float32_matmul_precision('medium')): 'amx' "
      "(tile instructions, TDPBF16PS), 'avx512_bf16' (VDPBF16PS), or 'none' "
      "(float32 FMAs on bfloat16 values). 'amx-emulated' where the "
      "environment variable TORCHITER_AMX=emulate runs the AMX code on a "
      "software model of the tiles, for tests.");
  m.def(
      "_sparse_rows_count", [] { return torchiter::cpu::sparse_rows_count(); },
      "Rows of (B, C) batches the CPU kernels' sparse-row driver has run in "
      "this process (it skips exact zeros of y in the channel mixing): for "
      "tests and benchmarks that need to know which driver ran.");
  m.def(
      "_sparse_blocks_count", [] { return torchiter::cpu::sparse_blocks_count(); },
      "Of those rows, the ones run by blocks of rows (run_sparse_blocks: A's "
      "columns by slices that fit L1), for tests.");
  m.def(
      "_cpu_capabilities",
      [] {
        std::vector<std::string> names;
        for (auto c : torchiter::cpu::supported_capabilities()) {
          names.push_back(torchiter::cpu::capability_name(c));
        }
        return names;
      },
      "The variants this build holds that the running CPU supports, "
      "narrowest first.");
  m.def(
      "_sgd_step_no_momentum", &sgd_step_no_momentum,
      "torch.ops.torchiter.sgd_step_ with momentum 0, for the iteration "
      "modules' hot loop (params, grads, lr, weight_decay, maximize, shrink, "
      "min, max).");
}
