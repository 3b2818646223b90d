"""Writes an AOTInductor package of an online NSM model for the C++ example.

    python3 examples/cpp/save_package.py OUT_DIR [--repeat N]

exports :class:`torchiter.scripting.ScriptableOnlineNSM` (one
``quadratic_descent`` call for the neural dynamics, then one Hebbian
``sgd_step_`` on its buffers) with ``torch.export``, compiles it with
``torch._inductor.aoti_compile_and_package`` into ``OUT_DIR/model.pt2``, saves
a float64 ``(8, 16)`` input as ``OUT_DIR/input.pt`` and prints the eager
output of the N-th forward call (default 1) in the program's format, for
comparison with ``torchiter_aoti_run OUT_DIR/model.pt2 OUT_DIR/input.pt N``.
Compiling the package takes about a minute (it compiles C++).
"""

import argparse
import copy
import os

import torch

import torchiter  # noqa: F401  (registers torch.ops.torchiter.*)
from save_model import print_tensor  # beside this script
from torchiter.scripting import ScriptableOnlineNSM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--repeat", type=int, default=1, help="forward calls before printing (default 1)")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    torch.manual_seed(0)
    model = ScriptableOnlineNSM(16, 4, lr=0.2, iterations=100, eta=0.05, dtype=torch.float64)
    x = torch.randn(8, 16, dtype=torch.float64)
    eager = copy.deepcopy(model)  # export and compile leave `model` as it is; run a copy anyway
    program = torch.export.export(model, (x,))
    torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(args.out_dir, "model.pt2"))
    torch.save(x, os.path.join(args.out_dir, "input.pt"))

    with torch.no_grad():
        for _ in range(args.repeat):
            y = eager(x)
    print_tensor("output.0", y)


if __name__ == "__main__":
    main()
