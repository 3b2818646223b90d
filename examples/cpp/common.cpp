#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/serialize.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>

namespace torchiter_example {

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

c10::IValue load_pickled(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot open ", path);
  std::vector<char> bytes(
      (std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes);
}

std::vector<c10::IValue> load_arguments(const std::string& path) {
  c10::IValue input = load_pickled(path);
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
  return args;
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

} // namespace torchiter_example
