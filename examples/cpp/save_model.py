"""Writes a TorchScript NSM model and an input for the C++ example program.

    python3 examples/cpp/save_model.py OUT_DIR [--online]

creates ``OUT_DIR/model.pt`` (``torch.jit.save`` of a scripted
:class:`torchiter.scripting.ScriptableNSM`, or of :class:`ScriptableOnlineNSM`
with ``--online``) and ``OUT_DIR/input.pt`` (``torch.save`` of a float64
``(8, 16)`` input), and prints the eager output of one forward call in the
program's format, for comparison with ``torchiter_run OUT_DIR/model.pt
OUT_DIR/input.pt``.
"""

import argparse
import os
import warnings

import torch

import torchiter  # noqa: F401  (registers torch.ops.torchiter.*)
from torchiter.scripting import ScriptableNSM, ScriptableOnlineNSM


def print_tensor(name: str, t: torch.Tensor) -> None:
    """Prints a float64 tensor in the example programs' format."""
    print(f"tensor {name} Double {' '.join(str(s) for s in t.shape)}")
    for v in t.detach().double().flatten().tolist():
        print(f"{v:.17g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--online", action="store_true", help="also take a Hebbian sgd_step_ per call")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    torch.manual_seed(0)
    cls = ScriptableOnlineNSM if args.online else ScriptableNSM
    model = cls(16, 4, lr=0.2, iterations=100, dtype=torch.float64)
    x = torch.randn(8, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        # TorchScript is deprecated: a DeprecationWarning in torch 2.13, a FutureWarning in 2.14.
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        torch.jit.save(torch.jit.script(model), os.path.join(args.out_dir, "model.pt"))
    torch.save(x, os.path.join(args.out_dir, "input.pt"))

    print_tensor("output", model(x))


if __name__ == "__main__":
    main()
