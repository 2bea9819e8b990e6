"""Stage 6 and 7 cost of the head Laplace, each against one plain forward pass of the head, in one run.

    python benchmarks/bench_laplace.py [--images 32] [--backends backpack asdl curvlinops] [--threads 2]
    python benchmarks/bench_laplace.py --skip-fit --config /path/project/config.yaml --run_id v1 [--rows 16]

Fit (stage 6): N random head inputs (3 x 256 x 256, the packed layout) with random 0/1 targets; the
head is the seed architecture (Conv 3->16->16->1) with seeded random weights (the fit's cost does not
depend on the values). (a) one forward pass of the head over all N inputs, batched, no grad;
(b) ``laplace.head.fit_head_laplace`` (the stage-6 fit: per-pixel features, diagonal GGN of the
2-logit last layer) for each backend. Prints seconds and the ratio b/a (goal: at most 3x for the
default backend).

Predictive (stage 7, ``laplace.predictive``): on one batch of ``--promptsets`` head inputs, (a) one
head forward against (c) the closed-form maps (``closed_form_maps``: goal <= 1.3x) and (d) the
Monte-Carlo maps with ``--mc-samples`` draws (``uncertainty_maps``: goal <= 2x on a GPU). Without
``--config`` the head and posterior are seeded random ones; with ``--config`` and ``--run_id`` they
are the project's trained head and fitted posterior, and the closed-form maps are also compared with
``--reference-samples`` Monte-Carlo draws on the first ``--rows`` rows of ``--split``: Spearman
rank correlation of each map and the AUROC of each map at detecting the MAP head's pixel errors.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.cache.packed_reader import packed_dataset  # noqa: E402
from modules.core.config import load_config  # noqa: E402
from modules.core.paths import laplace_run_dir  # noqa: E402
from modules.laplace import head as lh  # noqa: E402
from modules.laplace.posterior import read_posterior_meta  # noqa: E402
from modules.scoring import metrics  # noqa: E402
from modules.stages.fit_laplace import HeadSamples  # noqa: E402
from modules.training.models import PromptAwareHead  # noqa: E402

MAP_NAMES = ("total_entropy", "expected_entropy", "mutual_information")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` calls on ``clock`` (``--clock cpu``: process CPU seconds, which other jobs on
    a shared machine do not inflate; with one torch thread it is the call's own work)."""
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def bench_fit(args) -> None:
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
    print(f"(a) head forward over {args.images} images: {forward_s:.3f} s")
    for backend in args.backends:
        fit_s = timed(lambda: lh.fit_head_laplace(head, samples, backend=backend), args.repeats)
        print(f"(b) fit_head_laplace [{backend}]: {fit_s:.3f} s   b/a = {fit_s / forward_s:.2f}")


def random_posterior() -> lh.LastLayerPosterior:
    torch.manual_seed(0)
    head = PromptAwareHead().eval()
    mean = torch.cat([head.final_conv.weight.detach().flatten(), head.final_conv.bias.detach()])
    return lh.LastLayerPosterior(head, mean, torch.full_like(mean, 1e-3), prior_precision=1.0)


def head_batches(samples: HeadSamples, rows: int, batch_size: int):
    """``(HeadInputs, targets B x H x W)`` over the first ``rows`` rows."""
    subset = [samples[index] for index in range(min(rows, len(samples)))]
    for inputs, targets in lh.iterate_in_batches(subset, batch_size):
        yield (inputs if isinstance(inputs, lh.HeadInputs) else lh.HeadInputs(inputs)), targets


def bench_predictive(posterior: lh.LastLayerPosterior, inputs: lh.HeadInputs, args) -> None:
    head = posterior.head

    def head_forward():
        with torch.inference_mode():
            return head(inputs.x) if inputs.image_embedding is None else head(inputs.x, inputs.image_embedding)

    def closed_form():
        with torch.inference_mode():
            return posterior.closed_form_maps(inputs)

    def monte_carlo():
        with torch.inference_mode():
            return posterior.uncertainty_maps(inputs, args.mc_samples, seed=0)

    forward_s = timed(head_forward, args.repeats)
    closed_s = timed(closed_form, args.repeats)
    mc_s = timed(monte_carlo, args.repeats)
    print(f"(a) head forward, {inputs.x.shape[0]} prompt sets: {forward_s * 1e3:.1f} ms")
    print(f"(c) closed-form maps: {closed_s * 1e3:.1f} ms   c/a = {closed_s / forward_s:.2f} (goal <= 1.3)")
    print(f"(d) Monte-Carlo maps, S = {args.mc_samples}: {mc_s * 1e3:.1f} ms   d/a = {mc_s / forward_s:.2f} "
          "(goal <= 2 on a GPU)")


def bench_agreement(posterior: lh.LastLayerPosterior, samples: HeadSamples, args) -> None:
    closed = {name: [] for name in MAP_NAMES}
    sampled = {name: [] for name in MAP_NAMES}
    errors = []
    for batch_index, (inputs, targets) in enumerate(head_batches(samples, args.rows, args.batch_size)):
        with torch.inference_mode():
            closed_maps = posterior.closed_form_maps(inputs)
            sampled_maps = posterior.uncertainty_maps(inputs, args.reference_samples, seed=batch_index)
            head = posterior.head
            logits = head(inputs.x) if inputs.image_embedding is None else head(inputs.x, inputs.image_embedding)
        errors.append((logits[:, 0] > 0) != (targets > 0.5))
        for name in MAP_NAMES:
            closed[name].append(closed_maps[name].flatten())
            sampled[name].append(sampled_maps[name].flatten())
    error = torch.cat([e.flatten() for e in errors])
    print(f"agreement with S = {args.reference_samples} Monte Carlo on {args.rows} {args.split} rows "
          f"({error.numel()} pixels, MAP error rate {float(error.float().mean()):.4f}):")
    for name in MAP_NAMES:
        ours, reference = torch.cat(closed[name]).double(), torch.cat(sampled[name]).double()
        auroc_closed, _ = metrics.error_detection_auc(ours, error)
        auroc_mc, _ = metrics.error_detection_auc(reference, error)
        print(f"  {name}: Spearman {metrics.spearman(ours, reference):.4f}; pixel-error AUROC closed form "
              f"{auroc_closed:.4f}, MC {auroc_mc:.4f}, difference {auroc_closed - auroc_mc:+.4f}; "
              f"mean {float(ours.mean()):.3g} vs {float(reference.mean()):.3g} nats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backends", nargs="+", default=["backpack", "asdl", "curvlinops"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--skip-fit", action="store_true", help="time the predictive only")
    parser.add_argument("--promptsets", type=int, default=4, help="head inputs per predictive call")
    parser.add_argument("--mc-samples", type=int, default=32)
    parser.add_argument("--config", type=Path, help="a project with a trained head and its fitted posterior")
    parser.add_argument("--run_id", default="v1")
    parser.add_argument("--split", default="test")
    parser.add_argument("--rows", type=int, default=16, help="rows compared with the Monte-Carlo reference")
    parser.add_argument("--reference-samples", type=int, default=1024)
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"CUDA: {torch.cuda.is_available()}, {args.clock} clock, best of {args.repeats}")
    if not args.skip_fit:
        bench_fit(args)
    if args.config is None:
        posterior = random_posterior()
        torch.manual_seed(1)
        inputs = lh.HeadInputs(torch.randn(args.promptsets, 3, 256, 256))
        bench_predictive(posterior, inputs, args)
        return
    cfg = load_config(args.config, ["wandb.enabled=false"])
    _, posterior = lh.load_head_posterior(cfg, args.run_id, "cpu")
    samples = HeadSamples(packed_dataset(cfg, args.split))
    inputs, _ = next(head_batches(samples, args.promptsets, args.promptsets))
    meta = read_posterior_meta(laplace_run_dir(cfg.project_root, "head", args.run_id))
    print(f"project {args.config}, run {args.run_id}: temperature {meta.temperature:g}, "
          f"prior precision {posterior.prior_precision:g}")
    bench_predictive(posterior, inputs, args)
    bench_agreement(posterior, samples, args)


if __name__ == "__main__":
    main()
