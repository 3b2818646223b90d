// Helpers shared by the example programs: the registration check, reading a
// file written by torch.save, and the output format both programs print.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <string>
#include <vector>

namespace torchiter_example {

// Prints each torchiter schema found in the dispatcher as a '#' comment line;
// false (with a message on stderr) when one is missing, i.e. the op library
// was not linked or was dropped by --as-needed.
bool check_registered();

// The object in a file written by torch.save (a tensor, or a tuple or list).
c10::IValue load_pickled(const std::string& path);

// The arguments a file holds: the tensor, or the elements of a tuple or list.
std::vector<c10::IValue> load_arguments(const std::string& path);

// "tensor NAME DTYPE SIZE..." then one value per line, row-major: floating
// values as %.17g (exact for float32 and float64), integers as they are.
void print_tensor(const std::string& name, const at::Tensor& tensor);

// print_tensor for every tensor of a (possibly nested) tuple or list,
// named NAME.0, NAME.1, ...
void print_result(const std::string& name, const c10::IValue& value);

} // namespace torchiter_example
