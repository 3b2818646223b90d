"""torchiter's whole-loop op against the same loop written in plain PyTorch and compiled by torch.compile.

Each row is one similarity-matching inner loop, ``y <- relu(y - lr (M y - Wx))``
(no projection for pca), a fixed number of iterations (no stop test), float32,
run four ways on the same inputs:

- original loop: the original library's per-iteration loop
  (``torchiter.reference.original_nsm_loop``: einsum gradient, a
  ``torch.optim.SGD`` step, the projection, the change read back each step);
- eager tight loop: the loop as a user would write it, ``for _ in range(K):
  y = relu(y - lr * (y @ M.T - Wx))``;
- compiled loop: that function under ``torch.compile(fullgraph=True)`` (its
  first-call compile time is printed separately);
- torchiter: the model's whole forward (``SimilarityMatching``, encoder
  included), its inner loop one ``quadratic_descent`` call.

Every candidate's output is checked against torchiter's. Rounds alternate the
candidates; figures are medians; ``vs compile`` is the compiled loop's time over
torchiter's (> 1: torchiter is faster). A batch sweep at C = 64 follows. Prints
the machine and the command.

    python benchmarks/bench_vs_compile.py [--threads 1 2] [--rounds 5] [--min-time 0.3] [--quick] [--half]

``--half`` prints the half-precision table instead: the conv and C = 256 rows
with model, inputs and every loop in float32, bfloat16 and float16 (torchiter
runs its inner loop in float32 and rounds once; the others round the state
every iteration).
"""

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_header, median, per_call  # noqa: E402

from torchiter.models import SimilarityMatching  # noqa: E402
from torchiter.reference import original_nsm_loop  # noqa: E402

# name: (input shape, encoder factory, channels, iterations, lr, relu)
TABLE = {
    "pca 1000 x 10 -> 3, 100 it": ((1000, 10), lambda: nn.Linear(10, 3, bias=False), 3, 100, 0.1, False),
    "clustering 100 x 2 -> 10, 200 it": ((100, 2), lambda: nn.Linear(2, 10), 10, 200, 0.05, True),
    "conv 100 x 1 x 28 x 28 -> 50 ch, 40 it": ((100, 1, 28, 28), lambda: nn.Conv2d(1, 50, 6, bias=False), 50, 40, 1.0, True),
    "4096 x 64 -> 16, 50 it": ((4096, 64), lambda: nn.Linear(64, 16, bias=False), 16, 50, 0.1, True),
    "4096 x 64 -> 64, 50 it": ((4096, 64), lambda: nn.Linear(64, 64, bias=False), 64, 50, 0.1, True),
    "4096 x 256 -> 128, 50 it": ((4096, 256), lambda: nn.Linear(256, 128, bias=False), 128, 50, 0.1, True),
    "4096 x 64 -> 256, 50 it": ((4096, 64), lambda: nn.Linear(64, 256, bias=False), 256, 50, 0.1, True),
    "2048 x 64 -> 512, 50 it": ((2048, 64), lambda: nn.Linear(64, 512, bias=False), 512, 50, 0.05, True),
    "1024 x 64 -> 1024, 50 it": ((1024, 64), lambda: nn.Linear(64, 1024, bias=False), 1024, 50, 0.05, True),
}
SWEEP = [256, 1024, 4096, 16384, 65536]




def build(shape, make_encoder, C, iters, lr, relu, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    x = torch.randn(shape)
    model = SimilarityMatching(
        make_encoder(), C, tau=0.5, max_iterations=iters, iteration_lr=lr,
        iteration_projection=nn.ReLU() if relu else None, divergence="ignore",
    )
    with torch.no_grad():
        # A trained competitor: symmetric, well conditioned, not the identity.
        P = 0.05 * torch.randn(C, C) / C ** 0.5
        model.competitor.weight.add_(P + P.T)
    return x.to(dtype), model.to(dtype)


def tight_loop(M, Wx, iters: int, lr: float, relu: bool):
    # Channels along dim 1, as the models keep them; M is symmetric.
    flat = Wx.movedim(1, -1)
    y = torch.zeros_like(flat)
    for _ in range(iters):
        y = y - lr * (y @ M.T - flat)
        if relu:
            y = torch.relu(y)
    return y.movedim(-1, 1)


def row(name, case, rounds, min_time, only=None, dtype=torch.float32, device="cpu"):
    shape, make_encoder, C, iters, lr, relu = case
    x, model = build(shape, make_encoder, C, iters, lr, relu, dtype=dtype)
    x, model = x.to(device), model.to(device)
    M = model.competitor.weight.detach()
    enc = model.encoder
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else None

    def encode():
        with torch.no_grad():
            return enc(x)

    def original():
        return original_nsm_loop(M, encode(), iters, lr, 0.0, relu)[0]

    def eager():
        return tight_loop(M, encode(), iters, lr, relu)

    # Each row compiles afresh: Dynamo keeps one cache per code object and
    # refuses the ninth shape (its recompile limit) under fullgraph=True.
    torch._dynamo.reset()
    compiled_loop = torch.compile(tight_loop, fullgraph=True, dynamic=False)

    def compiled():
        return compiled_loop(M, encode(), iters, lr, relu)

    # On CUDA also the compiled loop replayed as a CUDA graph, which removes
    # its per-kernel launch cost (a function of its own: a second cache entry).
    def tight_loop_graphs(M, Wx, iters: int, lr: float, relu: bool):
        return tight_loop(M, Wx, iters, lr, relu)

    graphs_loop = torch.compile(tight_loop_graphs, fullgraph=True, dynamic=False, mode="reduce-overhead") if cuda else None

    def graphs():
        # The graph's output buffer is overwritten by the next replay: clone.
        return graphs_loop(M, encode(), iters, lr, relu).clone()

    def torchiter_forward():
        return model(x)

    compile_s = {}
    with torch.no_grad():
        cands = {"original": original, "eager": eager, "compiled": compiled}
        if cuda:
            cands["graphs"] = graphs
        cands["torchiter"] = torchiter_forward
        cands = {k: v for k, v in cands.items() if only is None or k in only or k == "torchiter"}
        for k in ("compiled", "graphs"):
            if k in cands:
                if sync:
                    sync()
                t0 = time.perf_counter()
                cands[k]()
                if sync:
                    sync()
                compile_s[k] = time.perf_counter() - t0
        got = torchiter_forward()
        for label, fn in cands.items():
            if label == "torchiter":
                continue
            diff = (fn() - got).abs().max().item()
            scale = max(1.0, got.abs().max().item())
            # Half types: the other loops round the state every iteration,
            # torchiter once (its loop runs in float32).
            if not diff <= (1e-3 if dtype == torch.float32 else 0.1) * scale:
                raise AssertionError(f"{name}: the {label} loop differs from torchiter by {diff:.3g}")
        times = {k: [] for k in cands}
        ratios = []
        for _ in range(rounds):
            for k, fn in cands.items():
                times[k].append(per_call(fn, min_time, sync))
            ratios.append({k: times[k][-1] / times["torchiter"][-1] for k in cands})
    t = {k: median(v) * 1e3 for k, v in times.items()}
    return t, {k: median([r[k] for r in ratios]) for k in cands}, compile_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per timing (default 0.3)")
    ap.add_argument("--quick", action="store_true", help="the first two rows, 1 round: a smoke run")
    ap.add_argument("--half", action="store_true", help="only the bfloat16 and float16 table (conv and C = 256)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the table on the GPU, with a CUDA-graph column (mode='reduce-overhead')")
    args = ap.parse_args()
    table = dict(list(TABLE.items())[:2]) if args.quick else TABLE
    rounds = 1 if args.quick else args.rounds
    sweep = [] if args.quick else SWEEP
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(machine_header())
            print("no CUDA device: nothing to time")
            return
        print(machine_header("cuda"))
        if args.half:
            half_table([torch.get_num_threads()], rounds, args.min_time, device="cuda")
        else:
            cuda_table(table, sweep, rounds, args.min_time)
        return
    print(machine_header())
    if args.half:
        half_table(args.threads, rounds, args.min_time)
        return
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n## {threads} thread{'s' if threads > 1 else ''}: medians of {rounds} interleaved rounds (ms)")
        print("| workload | original loop | eager tight loop | compiled loop (compile s) | torchiter | torchiter vs compile |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, case in table.items():
            t, ratio, compile_s = row(name, case, rounds, args.min_time)
            print(f"| {name} | {t['original']:.3f} | {t['eager']:.3f} | {t['compiled']:.3f} ({compile_s['compiled']:.0f} s) | "
                  f"{t['torchiter']:.3f} | {ratio['compiled']:.2f}x |", flush=True)
        if sweep:
            print(f"\n### batch sweep at C = 64 (input 64, 50 iterations, ReLU), {threads} thread{'s' if threads > 1 else ''}")
            print("| batch | compiled loop | torchiter | torchiter vs compile |")
            print("| --- | --- | --- | --- |")
            for batch in sweep:
                case = ((batch, 64), lambda: nn.Linear(64, 64, bias=False), 64, 50, 0.1, True)
                t, ratio, _ = row(f"batch {batch}", case, rounds, args.min_time, only=("compiled", "torchiter"))
                print(f"| {batch} | {t['compiled']:.3f} | {t['torchiter']:.3f} | {ratio['compiled']:.2f}x |", flush=True)


def cuda_table(table, sweep, rounds, min_time):
    """The table on the GPU: wall time per forward with the device synchronised around each timing."""
    print(f"\n## CUDA: medians of {rounds} interleaved rounds (ms per forward, synchronised)")
    print("| workload | original loop | eager tight loop | compiled loop (compile s) | compiled + CUDA graphs (compile s) "
          "| torchiter | vs compiled | vs CUDA graphs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, case in table.items():
        t, ratio, cs = row(name, case, rounds, min_time, device="cuda")
        print(f"| {name} | {t['original']:.3f} | {t['eager']:.3f} | {t['compiled']:.3f} ({cs['compiled']:.0f} s) | "
              f"{t['graphs']:.3f} ({cs['graphs']:.0f} s) | {t['torchiter']:.3f} | {ratio['compiled']:.2f}x | "
              f"{ratio['graphs']:.2f}x |", flush=True)
    if sweep:
        print("\n### CUDA batch sweep at C = 64 (input 64, 50 iterations, ReLU)")
        print("| batch | compiled loop | compiled + CUDA graphs | torchiter | vs compiled | vs CUDA graphs |")
        print("| --- | --- | --- | --- | --- | --- |")
        for batch in sweep:
            case = ((batch, 64), lambda: nn.Linear(64, 64, bias=False), 64, 50, 0.1, True)
            t, ratio, _ = row(f"batch {batch}", case, rounds, min_time, only=("compiled", "graphs"), device="cuda")
            print(f"| {batch} | {t['compiled']:.3f} | {t['graphs']:.3f} | {t['torchiter']:.3f} | {ratio['compiled']:.2f}x | "
                  f"{ratio['graphs']:.2f}x |", flush=True)


HALF_ROWS = ["conv 100 x 1 x 28 x 28 -> 50 ch, 40 it", "4096 x 64 -> 256, 50 it"]


def half_table(threads_list, rounds, min_time, device="cpu"):
    """The models in their own half dtype: each loop in that dtype, torchiter's in float32 inside."""
    for threads in threads_list:
        torch.set_num_threads(threads)
        where = "CUDA" if device == "cuda" else f"{threads} thread{'s' if threads > 1 else ''}"
        print(f"\n## half precision, {where}: medians of {rounds} interleaved rounds (ms)")
        print("| workload | dtype | original loop | compiled loop | torchiter | vs original | vs compiled |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name in HALF_ROWS:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                t, ratio, _ = row(name, TABLE[name], rounds, min_time, only=("original", "compiled", "torchiter"), dtype=dtype,
                                  device=device)
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {t['original']:.3f} | {t['compiled']:.3f} | "
                      f"{t['torchiter']:.3f} | {ratio['original']:.2f}x | {ratio['compiled']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
