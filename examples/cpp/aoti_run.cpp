// Runs an AOTInductor package (.pt2) of a model that calls torchiter ops, from
// C++ without Python: the package's compiled code calls the custom ops through
// the dispatcher, which finds them because this program links the op library.
//
//   torchiter_aoti_run PACKAGE INPUT [REPEAT]
//
// PACKAGE is a file written by torch._inductor.aoti_compile_and_package (from
// a torch.export program). INPUT is a file written by torch.save in Python: a
// tensor (the forward's one argument) or a tuple/list of tensors. The package
// runs REPEAT times (default 1; a model that updates its buffers updates the
// package's copy each time). Output, on stdout, in torchiter_run's format:
// '#' comment lines, then for each output tensor of the last run
//
//   tensor output.I DTYPE SIZE...
//   VALUE                            one per line, row-major, %.17g
#include "common.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " PACKAGE INPUT [REPEAT]\n";
    return 64;
  }
  if (!torchiter_example::check_registered()) {
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::vector<at::Tensor> inputs;
    for (const c10::IValue& arg : torchiter_example::load_arguments(argv[2])) {
      TORCH_CHECK(arg.isTensor(), "INPUT must hold tensors only, got ", arg.type()->str());
      inputs.push_back(arg.toTensor());
    }
    const long repeat = argc == 4 ? std::strtol(argv[3], nullptr, 10) : 1;
    TORCH_CHECK(repeat >= 1, "REPEAT must be a positive integer, got ", argv[3]);
    std::vector<at::Tensor> outputs;
    {
      torch::NoGradGuard no_grad;
      for (long i = 0; i < repeat; ++i) {
        outputs = loader.run(inputs);
      }
    }
    std::printf("# package: %s, %zu output(s)\n", argv[1], outputs.size());
    for (size_t i = 0; i < outputs.size(); ++i) {
      torchiter_example::print_tensor("output." + std::to_string(i), outputs[i]);
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
