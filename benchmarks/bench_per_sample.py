"""Per-sample stopping against the batch-wide stop test, on the clustering workload.

The clustering workload of ``bench_workloads.py`` (similarity matching with
ReLU, 10 channels, ``tol = 1e-4``, 200 iterations at most) is run by the same
model with ``per_sample_stopping`` off (the stock test: the loop stops when the
largest change over the whole batch is below ``tol``) and on (each sample
stops on its own test; stopped samples leave the working batch). Both are
timed side by side in one run (call by call in alternation, medians), at the
workload's batch of 100 and at larger batches, where the samples' stopping
times spread further. The table also gives the iterations run (batch-wide, and
the mean and the largest per sample), the sample-iterations saved, and the
largest difference between the two results, which is below ``tol`` scale: the
samples that stop early stop where the batch-wide loop would have moved them
by less than ``tol`` per iteration.

Each batch size runs twice: with the workload as it is, and with a third of
the samples nearly blank (``x`` of size 1e-3, the encoder's bias set to
zero), which move by less than ``tol`` from the start and stop at their
first test: there more sample-iterations are saved. (Exactly blank samples
would be positions at rest, which the batch-wide loop leaves out as well.)
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_header, paired_medians, per_call  # noqa: E402
from bench_workloads import build  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-run-time", type=float, default=2.0)
    ap.add_argument("--batches", default="100,1000,10000", help="comma-separated batch sizes")
    ap.add_argument("--blank", default="0,0.33", help="comma-separated fractions of nearly blank samples")
    args = ap.parse_args()
    print(machine_header(args.device))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"# torch threads: {torch.get_num_threads()}")
    print("| batch | nearly blank samples | batch-wide test: iterations | per-sample: mean / max iterations | sample-iterations saved "
          "| batch-wide | per-sample | speedup | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for B, blank in [(int(v), float(f)) for v in args.batches.split(",") for f in args.blank.split(",")]:
        _, model, _ = build("clustering", args.device)
        torch.manual_seed(1)
        x = torch.randn(B, 2, device=args.device)
        if blank > 0:
            # Nearly blank samples spread over the batch, not in one block.
            x[torch.randperm(B)[: int(blank * B)].to(args.device)] *= 1e-3
            with torch.no_grad():
                model.encoder.bias.zero_()
        model.divergence = "ignore"
        model.per_sample_stopping = False
        y_b = model(x)
        n_b = int(model.iteration_stats.iterations)
        model.per_sample_stopping = True
        y_s = model(x)
        counts = model.iteration_stats.iterations.double()
        diff = (y_b - y_s).abs().max().item()
        saved = 1 - counts.sum().item() / (n_b * B)

        def run(flag):
            model.per_sample_stopping = flag
            model(x)
            sync()

        def batch_wide():
            run(False)

        def per_sample():
            run(True)

        # Enough call pairs for min_run_time seconds; medians of each.
        calls = max(20, int(args.min_run_time / (2 * per_call(per_sample, 0.05))))
        t_b, t_s = paired_medians(batch_wide, per_sample, calls)
        print(f"| {B} | {blank:.0%} | {n_b} | {counts.mean().item():.1f} / {int(counts.max())} | {saved:.0%} "
              f"| {t_b * 1e3:.3f} ms | {t_s * 1e3:.3f} ms | {t_b / t_s:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
