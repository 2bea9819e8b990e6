"""Laplace fit time against one plain forward pass of the head over the same data, in one run.

    python benchmarks/bench_laplace.py [--images 32] [--backends backpack asdl curvlinops] [--threads 2]

Data: N random head inputs (3 x 256 x 256, the packed layout) with random 0/1 targets; the head is
the seed architecture (Conv 3->16->16->1) with seeded random weights (the fit's cost does not
depend on the values). (a) one forward pass of the head over all N inputs, batched, no grad;
(b) ``laplace.head.fit_head_laplace`` (the stage-6 fit: per-pixel features, diagonal GGN
of the 2-logit last layer) for each backend. Prints seconds and the ratio b/a (goal: at most 3x
for the default backend).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.laplace import head as lh  # noqa: E402
from modules.training.models import PromptAwareHead  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backends", nargs="+", default=["backpack", "asdl", "curvlinops"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = PromptAwareHead().eval()
    inputs = torch.randn(args.images, 3, 256, 256)
    targets = (torch.rand(args.images, 256, 256) > 0.7).float()
    samples = [(inputs[i], targets[i]) for i in range(args.images)]

    @torch.no_grad()
    def forward() -> None:
        for start in range(0, args.images, args.batch_size):
            head(inputs[start:start + args.batch_size])

    forward_s = timed(forward, args.repeats)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"CUDA: {torch.cuda.is_available()}")
    print(f"(a) head forward over {args.images} images: {forward_s:.3f} s")
    for backend in args.backends:
        fit_s = timed(lambda: lh.fit_head_laplace(head, samples, backend=backend), args.repeats)
        print(f"(b) fit_head_laplace [{backend}]: {fit_s:.3f} s   b/a = {fit_s / forward_s:.2f}")


if __name__ == "__main__":
    main()
