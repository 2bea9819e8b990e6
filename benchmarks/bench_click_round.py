"""One simulated click round against one decoder + head pass over the same B images, one run.

On a project with trained runs (head, Laplace, variance network: e.g. the demo after
``run_pipeline.py``), for B images of the evaluation split with P = the configured policies' lanes
(one prompt set per policy, ``random_draws`` for a random one), each already past its first click:

- baseline: per image, one decoder call for the P prompt sets on the cached features
  (``cache.entries.decoded_entry``) and the head's inputs (``EvalSample.build``), then the MAP head
  (``MapHeadStrategy.predict_batch``) over ``--batch`` images at a time: what scoring those P prompt
  sets costs at the least;
- click round: every policy of every image chooses, the annotator answers, then per image the
  decoder call, and the strategies the policies read and the scoring of the round over ``--batch``
  images at a time (``ClickSimulator.choose`` + ``score_batch``, as the simulation with
  ``evaluation.active_prompting.batch_images = --batch``);
- the same round image by image (``--batch 1``), for the gain of batching.

Each figure is the best of ``--repeats`` passes over the B images (every pass starts from the same
state: the round is timed on copies); the ratio is round / baseline, both measured here, in this run.
``--policies`` varies the set (prompt perturbation alone costs K decoder calls).

Usage: python benchmarks/bench_click_round.py --config PROJECT_CONFIG [--run_id v1] [--images 4] [--batch 4]
       [--policies oracle,bald,...] [--repeats 3] [--threads 2] [--set KEY=VALUE ...]
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
    parser.add_argument("--images", type=int, default=4, help="images in all")
    parser.add_argument("--batch", type=int, default=1, help="B: images simulated together")
    parser.add_argument("--policies", default=None, help="comma-separated (default: the config's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    torch.set_num_threads(args.threads)
    overrides = [*args.set, "evaluation.active_prompting.enabled=true", "training.device=cpu", "sam.device=cpu"]
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
    batches = [runs[start:start + args.batch] for start in range(0, len(runs), args.batch)]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads; {len(samples)} images, B = {args.batch} together, P = {len(simulator.lanes)} "
          f"prompt sets per image ({', '.join(simulator.policies)}; random x "
          f"{cfg.evaluation.active_prompting.random_draws}), strategies: {', '.join(simulator.strategies)}")

    records = [simulator.record(run) for run in runs]

    decode_records = dict(zip(map(id, runs), records))

    def baseline() -> None:
        with torch.inference_mode():
            for batch in batches:
                head.predict_batch([simulator.decode(run.sample, run.features, decode_records[id(run)])
                                    for run in batch])

    def click_round(size: int) -> None:
        fresh = [copy.deepcopy(run) for run in runs]
        for start in range(0, len(fresh), size):
            batch = fresh[start:start + size]
            for run in batch:
                simulator.choose(run)
            simulator.score_batch(batch)

    baseline()  # warm-up
    click_round(args.batch)
    base = best_of(args.repeats, baseline)
    copies = best_of(args.repeats, lambda: [copy.deepcopy(run) for run in runs])
    round_time = best_of(args.repeats, lambda: click_round(args.batch)) - copies
    alone = best_of(args.repeats, lambda: click_round(1)) - copies if args.batch > 1 else round_time
    print(f"decoder + head pass over the images: {base * 1000:.0f} ms ({base / len(runs) * 1000:.0f} ms per image)")
    print(f"one click round, B = {args.batch}:          {round_time * 1000:.0f} ms ({round_time / len(runs) * 1000:.0f} "
          f"ms per image; state copies {copies * 1000:.0f} ms subtracted)")
    print(f"ratio round / (decoder + head): {round_time / base:.2f}x (goal <= 2x)")
    if args.batch > 1:
        print(f"one click round image by image: {alone * 1000:.0f} ms; batched / image by image: "
              f"{round_time / alone:.2f}x")


if __name__ == "__main__":
    main()
