"""Stage-7 cost of the unseen-domain protocol's scoring and reports, against the scoring it extends, one run.

Synthetic outputs shaped like the demo evaluation's (``--samples`` images of ``--height`` x ``--width``
in six groups, P prompt sets, the default methods with their maps: 24 maps over 9 methods), no model:

1. scoring per sample: ``Scoreboard.score_sample`` with ``data.unseen_groups`` set (the seen / unseen
   accumulators, the per-image sums, the mask-quality scores) against the baseline, the scoring before
   the protocol: every map's accumulator in its group and ``overall`` plus the per-mask rows;
2. the report tables (``summary_frame`` and ``mask_quality_frame``, no figures) with
   ``--bootstrap`` replicates against one replicate (the tables without the intervals' cost).

Each figure is the best of ``--repeats`` runs. Usage: python benchmarks/bench_unseen_scoring.py
[--samples 24] [--promptsets 4] [--height 240 --width 320] [--bootstrap 1000] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.cache.sam_cache import CacheEntry  # noqa: E402
from modules.data.promptset import PromptSpec, build_promptset_record  # noqa: E402
from modules.evaluation import reports  # noqa: E402
from modules.evaluation.intervals import BootstrapSettings, DomainResampler, mask_quality_frame  # noqa: E402
from modules.evaluation.samples import LabelledSample  # noqa: E402
from modules.evaluation.scoreboard import OVERALL, Scoreboard, upsample  # noqa: E402
from modules.scoring.entropy import binary_entropy  # noqa: E402
from modules.uncertainty.strategies import EvalSample, StrategyOutput  # noqa: E402
from benchmarks.timing import best_of  # noqa: E402

GROUPS = ("plain", "camouflage", "shadow", "transparent", "medical_gray", "thin")
UNSEEN = frozenset({"medical_gray", "thin"})
#: method -> its maps (the default strategies and the refinement variants).
METHOD_MAPS = {
    "raw_sam": ["entropy"], "map_head": ["entropy"],
    "tta": ["entropy", "std", "mutual_information", "expected_entropy"],
    "prompt_perturbation": ["entropy", "std", "mutual_information", "expected_entropy"],
    "laplace": ["total_entropy", "mutual_information", "expected_entropy"],
    "variance_network": ["log_variance", "entropy"],
    "refined": ["entropy"], "refined_constant": ["entropy"], "refined_oracle_mask": ["entropy"],
}


def make_samples(count: int, promptsets: int, hw: tuple[int, int]) -> list[tuple[LabelledSample, dict]]:
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[: hw[0], : hw[1]]
    spec = PromptSpec(min_pairs=1, max_pairs=3, prompt_seed=7, gaussian_sigma=4.0, box_jitter=0.0)
    samples = []
    for index in range(count):
        mask = (rows - hw[0] / 2) ** 2 + (cols - hw[1] / 2) ** 2 < (hw[0] / 4) ** 2
        safe_id = f"s{index}"
        record = build_promptset_record({"sample_id": f"g/{safe_id}", "safe_id": safe_id}, "test", mask, promptsets,
                                        spec, source={})
        logits = (rng.standard_normal((promptsets, 256, 256)) * 8).astype(np.float16)
        entry = CacheEntry(safe_id=safe_id, split="test", features={}, logits=logits,
                           promptset_ids=np.arange(promptsets, dtype=np.int32),
                           branch_index=np.zeros(promptsets, np.int8),
                           iou_predictions=rng.random((promptsets, 3)).astype(np.float32), original_hw=hw,
                           input_hw=(192, 256), promptset_md5="0" * 32)
        sample = EvalSample.build(safe_id, GROUPS[index % len(GROUPS)], entry, record, 20.0)
        prob = torch.sigmoid(torch.from_numpy(logits.astype(np.float32)) / 4)
        outputs = {}
        for method, maps in METHOD_MAPS.items():
            values = {name: (torch.rand(promptsets, 256, 256) * 4 - 2 if name == "log_variance"
                             else binary_entropy(prob) * torch.rand(promptsets, 256, 256)) for name in maps}
            outputs[method] = StrategyOutput(prob, values, maps[0])
        samples.append((LabelledSample(sample, mask), outputs))
    return samples


def baseline_scoring(board: Scoreboard, labelled: LabelledSample, outputs: dict) -> None:
    """The scoring before the protocol: each map in its group and overall, and the per-mask rows."""
    sample = labelled.inputs
    gt = torch.from_numpy(labelled.ground_truth)
    gt_stack = gt.expand(sample.num_promptsets, *sample.original_hw)
    for method, output in outputs.items():
        prob = upsample(output.mean_prob, sample.original_hw, board.device).clamp_(0.0, 1.0)
        maps = {name: upsample(values, sample.original_hw, board.device) for name, values in output.maps.items()}
        for name, values in maps.items():
            for domain in (sample.group, OVERALL):
                board.accumulator(method, name, domain).update(prob, gt_stack, values)
        for index in range(sample.num_promptsets):
            board.rows.append(board._mask_row(sample, method, index, prob[index], gt,
                                              {name: values[index] for name, values in maps.items()},
                                              output.primary_map))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--promptsets", type=int, default=4)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = make_samples(args.samples, args.promptsets, (args.height, args.width))
    device = torch.device("cpu")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.samples} samples of {args.height} x {args.width}, P = {args.promptsets}, "
          f"{sum(map(len, METHOD_MAPS.values()))} maps over {len(METHOD_MAPS)} methods")

    def score(protocol: bool) -> Scoreboard:
        board = Scoreboard(15, device, UNSEEN if protocol else frozenset())
        for labelled, outputs in samples:
            if protocol:
                board.score_sample(labelled, outputs)
            else:
                baseline_scoring(board, labelled, outputs)
        return board

    baseline = best_of(args.repeats, lambda: score(False))
    protocol = best_of(args.repeats, lambda: score(True))
    print(f"scoring per sample: baseline {1000 * baseline / args.samples:.0f} ms, with the protocol "
          f"{1000 * protocol / args.samples:.0f} ms ({protocol / baseline:.2f}x)")

    board = score(True)
    methods = list(METHOD_MAPS)

    def tables(replicates: int) -> None:
        settings = BootstrapSettings(samples=replicates, seed=0)
        reports.summary_frame(board, methods, ["refined", "refined_constant", "refined_oracle_mask"], settings)
        mask_quality_frame(pd.DataFrame(board.rows), methods, board.unseen_groups,
                           DomainResampler(settings))

    one = best_of(args.repeats, lambda: tables(1))
    full = best_of(args.repeats, lambda: tables(args.bootstrap))
    print(f"report tables: 1 replicate {one:.2f} s, {args.bootstrap} replicates {full:.2f} s ({full / one:.2f}x)")


if __name__ == "__main__":
    main()
