// The public op schemas of torchiter, declared once. Kernels register
// themselves per dispatch key in csrc/ops/{cpu,cuda,meta}/. This file has no
// Python dependency, so a C++ program that links the op library finds every
// op through the dispatcher.
#include "ops/ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/jit/runtime/custom_operator.h>
#include <torch/library.h>

#include <string>

// TorchScript entry points of sgd_step_. TorchScript's alias analysis does not
// model writes to the elements of a list argument (`Tensor(a!)[]`), so its
// dead-code elimination drops a step whose list is built in the graph (a
// literal `[p]`, a function that returns nothing), silently. It keeps a node
// only if the op has side effects, which TorchScript grants to CONSERVATIVE
// alias analysis alone, and that is refused for schemas with annotations,
// which torch.compile, torch.export and eager mode need. So TorchScript gets
// two operators of its own, under the same name: the same arguments without
// annotations, CONSERVATIVE, each forwarding its stack to the dispatcher's
// op. They are registered before the schemas below, and TorchScript takes the
// first overload that matches, so every scripted call (also in a graph loaded
// from C++) binds to them; nothing else is changed by them.
namespace {

template <const char* kOverload>
void sgd_step_from_script(torch::jit::Stack& stack) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("torchiter::sgd_step_", kOverload);
  op.callBoxed(&stack);
}

constexpr char kDefaultOverload[] = "";
constexpr char kTensorLrOverload[] = "tensor_lr";

constexpr const char* kScriptArgs =
    "Tensor[] grads, Tensor[] momentum_buffers, {lr}, float momentum=0., "
    "float dampening=0., float weight_decay=0., bool nesterov=False, "
    "bool maximize=False, bool first_step=False, float shrink=0., "
    "float? min=None, float? max=None) -> ()";

std::string script_schema(const std::string& overload, const std::string& lr) {
  std::string args = kScriptArgs;
  args.replace(args.find("{lr}"), 4, lr);
  return "torchiter::sgd_step_." + overload + "(Tensor[] params, " + args;
}

const torch::jit::RegisterOperators sgd_step_script_entry_points({
    torch::jit::Operator(
        script_schema("script", "float lr"),
        &sgd_step_from_script<kDefaultOverload>,
        c10::AliasAnalysisKind::CONSERVATIVE),
    torch::jit::Operator(
        script_schema("script_tensor_lr", "Tensor lr"),
        &sgd_step_from_script<kTensorLrOverload>,
        c10::AliasAnalysisKind::CONSERVATIVE),
});

} // namespace

TORCH_LIBRARY(torchiter, m) {
  // The float overload is declared first: Python tries overloads in order,
  // and a failed match costs more than the step itself on small tensors. A
  // 0-dim tensor lr passed to the raw op from Python is then read as a float;
  // torchiter.ops.sgd_step_ (and TorchScript, which matches types exactly
  // first) picks the Tensor overload, with no host synchronisation.
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, float lr, float momentum=0., "
      "float dampening=0., float weight_decay=0., bool nesterov=False, "
      "bool maximize=False, bool first_step=False, float shrink=0., "
      "float? min=None, float? max=None) -> ()");
  m.def(
      "sgd_step_.tensor_lr(Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, Tensor lr, float momentum=0., "
      "float dampening=0., float weight_decay=0., bool nesterov=False, "
      "bool maximize=False, bool first_step=False, float shrink=0., "
      "float? min=None, float? max=None) -> ()");
  m.def(
      "quadratic_descent(Tensor y0, Tensor A, Tensor b, float lr, "
      "int max_iterations, float tol=0., int check_every=1, "
      "Tensor? lrs=None, float shrink=0., float? min=None, "
      "float? max=None) -> (Tensor, Tensor)");
  // The same loop with its statistics (ops.h, QuadraticDescentResult) and,
  // optionally, a stop test per sample; and, with the same schema, the same
  // op through the device-generic driver (the CUDA path) on the CPU, for tests.
#define TORCHITER_QUADRATIC_DESCENT_EX_SCHEMA                            \
  "(Tensor y0, Tensor A, Tensor b, float lr, "                           \
  "int max_iterations, float tol=0., int check_every=1, "                \
  "Tensor? lrs=None, float shrink=0., float? min=None, "                 \
  "float? max=None, bool per_sample=False, bool trace=False) -> "        \
  "(Tensor y, Tensor iterations, Tensor converged, Tensor change, "      \
  "Tensor growth, Tensor change_trace)"
  m.def("quadratic_descent_ex" TORCHITER_QUADRATIC_DESCENT_EX_SCHEMA);
  m.def("_quadratic_descent_ex_generic" TORCHITER_QUADRATIC_DESCENT_EX_SCHEMA);
#undef TORCHITER_QUADRATIC_DESCENT_EX_SCHEMA
  // Gradients of quadratic_descent's y with respect to A and b at its fixed
  // point (csrc/ops/autograd/quadratic_descent.cpp has the derivation).
  m.def(
      "quadratic_descent_backward(Tensor grad_y, Tensor y, Tensor A, "
      "float shrink=0., float? min=None, float? max=None) "
      "-> (Tensor grad_A, Tensor grad_b)");
}

// With every list empty the dispatcher sees no tensor and would fail to pick
// a backend; the step is then a no-op. For any other call this kernel is
// shadowed by the backend kernels, so it runs only for tensors no backend
// takes (sparse ones, a device torchiter was not built for): the shared
// checks name the offending argument, else the device is refused.
namespace {
void sgd_step_no_backend(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    double /*lr, in opt*/, const torchiter::SgdOptions& opt) {
  torchiter::check_sgd_step(params, grads, bufs, opt);
  TORCH_CHECK(
      params.empty(), "torchiter.sgd_step_: no kernel for tensors on ",
      params[0].device(), " (was torchiter built with support for this device?)");
}
} // namespace

TORCH_LIBRARY_IMPL(torchiter, CompositeExplicitAutograd, m) {
  m.impl("sgd_step_", &torchiter::sgd_step_entry<double, &sgd_step_no_backend>);
}

// sgd_step_ writes its params and momentum buffers in place. Like ATen's own
// in-place ops, it bumps their version counters (ADInplaceOrView key), so
// autograd reports a graph that saved one of them instead of silently using
// the new values.
namespace {
// An AOTInductor package's runtime passes an empty Tensor[] argument (the
// momentum buffers without momentum) as None; the kernels below take lists,
// so None becomes an empty list on the stack before it is read.
void empty_lists_for_none(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema_args = op.schema().arguments();
  const size_t first = stack->size() - schema_args.size();
  for (size_t i = 0; i < schema_args.size(); ++i) {
    c10::IValue& v = (*stack)[first + i];
    if (v.isNone() && schema_args[i].type()->kind() == c10::TypeKind::ListType) {
      v = c10::List<at::Tensor>();
    }
  }
}

void sgd_step_bump_versions(
    const c10::OperatorHandle& op,
    c10::DispatchKeySet ks,
    torch::jit::Stack* stack) {
  empty_lists_for_none(op, stack);
  const auto args = torch::jit::last(*stack, op.schema().arguments().size());
  const std::vector<at::Tensor> params = args[0].toTensorVector();
  const std::vector<at::Tensor> bufs = args[2].toTensorVector();
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  for (const auto* list : {&params, &bufs}) {
    for (const at::Tensor& t : *list) {
      torch::autograd::impl::bump_version(t);
    }
  }
}
} // namespace

TORCH_LIBRARY_IMPL(torchiter, ADInplaceOrView, m) {
  m.impl("sgd_step_", torch::CppFunction::makeFromBoxedFunction<&sgd_step_bump_versions>());
  m.impl("sgd_step_.tensor_lr", torch::CppFunction::makeFromBoxedFunction<&sgd_step_bump_versions>());
}

// The step is not differentiable and returns nothing; without this the
// dispatcher's generic autograd fallback inspects every argument on each
// call (a few microseconds of a small step).
TORCH_LIBRARY_IMPL(torchiter, Autograd, m) {
  m.impl("sgd_step_", torch::CppFunction::makeFallthrough());
  m.impl("sgd_step_.tensor_lr", torch::CppFunction::makeFallthrough());
}
