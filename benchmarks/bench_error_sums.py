"""Stage 7 scoring: the cost of the exact error / correct uncertainty sums (``error_to_correct_ratio``)
against one whole ``UncertaintyAccumulator.update`` of the same mask, in one run.

    python benchmarks/bench_error_sums.py --masks 4 --size 512 --repeats 20
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.scoring.metrics import UncertaintyAccumulator  # noqa: E402
from benchmarks.timing import best_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shape = (args.masks, args.size, args.size)
    p, u = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    y = torch.rand(shape, generator=generator) > 0.5
    errors = (p > 0.5) != y
    accumulator = UncertaintyAccumulator((0.0, 1.0))
    accumulator.update(p, y, u)  # allocate the state

    def sums() -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float64).index_add_(0, errors.reshape(-1).long(), u.reshape(-1).double())

    whole = best_of(args.repeats, lambda: accumulator.update(p, y, u))
    part = best_of(args.repeats, sums)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.masks} x {args.size} x {args.size} pixels")
    print(f"update (sums included): {whole * 1e3:.1f} ms; the sums alone: {part * 1e3:.1f} ms; "
          f"share {part / whole:.3f}")


if __name__ == "__main__":
    main()
