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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

// The op library registers its schemas and kernels when it is loaded; a
// missing schema means it was not linked (or was dropped by --as-needed).
bool check_registered() {
  const std::pair<const char*, const char*> ops[] = {
      {"torchiter::sgd_step_", ""},
      {"torchiter::sgd_step_", "tensor_lr"},
      {"torchiter::quadratic_descent", ""},
  };
  bool ok = true;
  for (const auto& [name, overload] : ops) {
    auto op = c10::Dispatcher::singleton().findSchema({name, overload});
    if (!op) {
      std::cerr << "error: " << name << (*overload ? "." : "") << overload
                << " is not registered (is the torchiter op library linked?)\n";
      ok = false;
      continue;
    }
    std::printf(
        "# registered%s: %s\n",
        op->hasKernelForDispatchKey(c10::DispatchKey::CPU) ? " (CPU kernel)" : "",
        c10::toString(op->schema()).c_str());
  }
  return ok;
}

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

c10::IValue load_pickled(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot open ", path);
  std::vector<char> bytes(
      (std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes);
}

void print_tensor(const std::string& name, const at::Tensor& tensor) {
  at::Tensor t = tensor.detach().cpu().contiguous();
  std::printf("tensor %s %s", name.c_str(), c10::toString(t.scalar_type()));
  for (int64_t size : t.sizes()) {
    std::printf(" %lld", static_cast<long long>(size));
  }
  std::printf("\n");
  if (at::isFloatingType(t.scalar_type())) {
    at::Tensor d = t.to(at::kDouble);
    const double* p = d.const_data_ptr<double>();
    for (int64_t i = 0; i < d.numel(); ++i) {
      std::printf("%.17g\n", p[i]);
    }
  } else {
    at::Tensor l = t.to(at::kLong);
    const int64_t* p = l.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < l.numel(); ++i) {
      std::printf("%lld\n", static_cast<long long>(p[i]));
    }
  }
}

// Prints every tensor of a (possibly nested) tuple/list result.
void print_result(const std::string& name, const c10::IValue& value) {
  if (value.isTensor()) {
    print_tensor(name, value.toTensor());
  } else if (value.isTuple()) {
    const auto& elements = value.toTupleRef().elements();
    for (size_t i = 0; i < elements.size(); ++i) {
      print_result(name + "." + std::to_string(i), elements[i]);
    }
  } else if (value.isList()) {
    auto list = value.toList();
    for (size_t i = 0; i < list.size(); ++i) {
      print_result(name + "." + std::to_string(i), list.get(i));
    }
  } else if (!value.isNone()) {
    std::printf("# %s: %s\n", name.c_str(), c10::toString(value.type()).c_str());
  }
}

} // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " MODEL INPUT [REPEAT]\n";
    return 64;
  }
  if (!check_registered()) {
    return 2;
  }
  try {
    direct_call_demo();
    torch::jit::Module module = torch::jit::load(argv[1]);
    module.eval();

    c10::IValue input = load_pickled(argv[2]);
    std::vector<c10::IValue> args;
    if (input.isTuple()) {
      for (const auto& element : input.toTupleRef().elements()) {
        args.push_back(element);
      }
    } else if (input.isList()) {
      for (const auto& element : input.toListRef()) {
        args.push_back(element);
      }
    } else {
      args.push_back(input);
    }

    const long repeat = argc == 4 ? std::strtol(argv[3], nullptr, 10) : 1;
    TORCH_CHECK(repeat >= 1, "REPEAT must be a positive integer, got ", argv[3]);
    c10::IValue output;
    {
      torch::NoGradGuard no_grad;
      for (long i = 0; i < repeat; ++i) {
        output = module.forward(args);
      }
    }
    print_result("output", output);
    for (const auto& buffer : module.named_buffers()) {
      print_tensor("buffer." + buffer.name, buffer.value);
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
