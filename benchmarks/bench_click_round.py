"""One simulated click round against one decoder + head pass over the same B images, one run.

On a project with trained runs (head, Laplace, variance network: e.g. the demo after
``run_pipeline.py``), for B images of the evaluation split with P = the configured policies, each
already past its first click:

- baseline: per image, one decoder call for the P prompt sets on the cached features
  (``cache.entries.decoded_entry``), the head's inputs (``EvalSample.build``) and one forward of the
  MAP head (``MapHeadStrategy``): what scoring those P prompt sets costs at the least;
- click round: per image, every policy chooses, the annotator answers, then the decoder call, the
  strategies the policies read and the scoring of the round (``ClickSimulator.choose`` + ``score``).

Each figure is the best of ``--repeats`` passes over the B images (every pass starts from the same
state: the round is timed on copies); the ratio is round / baseline, both measured here, in this run.
``--policies`` varies the set (prompt perturbation alone costs K decoder calls).

Usage: python benchmarks/bench_click_round.py --config PROJECT_CONFIG [--run_id v1] [--images 4]
       [--policies oracle,bald,...] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.cache.training_index import open_cache  # noqa: E402
from modules.core.config import load_config  # noqa: E402
from modules.evaluation.runs import Artifacts, RunIds  # noqa: E402
from modules.evaluation.samples import list_eval_units, load_sample  # noqa: E402
from modules.interactive.simulation import ClickSimulator  # noqa: E402
from modules.uncertainty.strategies import MapHeadStrategy  # noqa: E402
from benchmarks.timing import best_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run_id", default="v1")
    parser.add_argument("--images", type=int, default=4, help="B")
    parser.add_argument("--policies", default=None, help="comma-separated (default: the config's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = ["evaluation.active_prompting.enabled=true", "training.device=cpu", "sam.device=cpu"]
    if args.policies:
        overrides.append(f"evaluation.active_prompting.policies=[{args.policies}]")
    cfg = load_config(args.config, overrides)
    artifacts = Artifacts(cfg, RunIds.resolve(args.run_id), torch.device("cpu"))
    simulator = ClickSimulator(cfg, artifacts)
    head = MapHeadStrategy(artifacts.head)
    cache = open_cache(cfg)
    samples = [load_sample(cfg, cache, unit) for unit in list_eval_units(cfg)[:args.images]]
    runs = []
    for labelled in samples:  # past the first click: scored once, as in the simulation
        run = simulator.start(labelled, unseen=False)
        simulator.score(run)
        runs.append(run)
    policies = len(simulator.policies)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads; B = {len(samples)} images, P = {policies} policies "
          f"({', '.join(simulator.policies)}), strategies: {', '.join(simulator.strategies)}")

    records = [simulator.record(run) for run in runs]

    def baseline() -> None:
        with torch.inference_mode():
            for run, record in zip(runs, records):
                head.predict(simulator.decode(run.sample, run.features, record))

    def click_round() -> None:
        for run in [copy.deepcopy(run) for run in runs]:
            simulator.choose(run)
            simulator.score(run)

    baseline()  # warm-up
    click_round()
    base = best_of(args.repeats, baseline)
    copies = best_of(args.repeats, lambda: [copy.deepcopy(run) for run in runs])
    round_time = best_of(args.repeats, click_round) - copies
    print(f"decoder + head pass over B images: {base * 1000:.0f} ms ({base / len(runs) * 1000:.0f} ms per image)")
    print(f"one click round over B images:     {round_time * 1000:.0f} ms ({round_time / len(runs) * 1000:.0f} ms "
          f"per image; state copies {copies * 1000:.0f} ms subtracted)")
    print(f"ratio round / (decoder + head): {round_time / base:.2f}x (goal <= 2x)")


if __name__ == "__main__":
    main()
