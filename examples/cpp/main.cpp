// Runs a TorchScript model that calls torchiter ops, from C++ without Python.
//
//   torchiter_run MODEL INPUT [REPEAT]
//
// MODEL is a file written by torch.jit.save. INPUT is a file written by
// torch.save in Python: a tensor (the forward's one argument) or a tuple/list
// of tensors (its arguments). forward runs REPEAT times (default 1; stateful
// models update their buffers each time). Output, on stdout:
//
//   # comment lines, starting with '#'
//   tensor NAME DTYPE SIZE...        one header per tensor, then its values
//   VALUE                            one per line, row-major; floating values
//                                    as %.17g (exact for float32 and float64)
//
// for each tensor of the last forward's result (output.0, output.1, ...), then
// for each buffer of the model after the last call (buffer.W, ...).
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/script.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

namespace {

// Calls an op directly through the dispatcher, without TorchScript: the
// minimiser of ½·2y² − y is 0.5.
void direct_call_demo() {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchiter::quadratic_descent", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
              int64_t, double, int64_t, const std::optional<at::Tensor>&,
              double, std::optional<double>, std::optional<double>)>();
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto [y, iterations] = op.call(
      at::zeros({1, 1}, opts), at::full({1, 1}, 2.0, opts), at::ones({1, 1}, opts),
      0.25, 100, 1e-12, 1, std::nullopt, 0.0, 0.0, std::nullopt);
  std::printf(
      "# direct call: quadratic_descent(A=2, b=1) -> y=%.17g after %lld iterations\n",
      y.item<double>(), static_cast<long long>(iterations.item<int64_t>()));
}

} // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " MODEL INPUT [REPEAT]\n";
    return 64;
  }
  if (!torchiter_example::check_registered()) {
    return 2;
  }
  try {
    direct_call_demo();
    torch::jit::Module module = torch::jit::load(argv[1]);
    module.eval();

    std::vector<c10::IValue> args = torchiter_example::load_arguments(argv[2]);

    const long repeat = argc == 4 ? std::strtol(argv[3], nullptr, 10) : 1;
    TORCH_CHECK(repeat >= 1, "REPEAT must be a positive integer, got ", argv[3]);
    c10::IValue output;
    {
      torch::NoGradGuard no_grad;
      for (long i = 0; i < repeat; ++i) {
        output = module.forward(args);
      }
    }
    torchiter_example::print_result("output", output);
    for (const auto& buffer : module.named_buffers()) {
      torchiter_example::print_tensor("buffer." + buffer.name, buffer.value);
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
