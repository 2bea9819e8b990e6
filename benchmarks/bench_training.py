"""Training step cost of the head, the variance network and the fusion module: the old path against
the current one, in one run.

    python benchmarks/bench_training.py [--batch-size 8] [--rows-per-image 10] [--repeats 3] [--threads 2]
                                        [--skip fusion]

Same seeded inputs for both paths of each model (packed layout: ``B x 3 x 256 x 256`` float16
inputs, binary targets; the models are the seed architectures with seeded random weights, whose
values do not change the cost):

1. head: one optimizer step (BCE + Dice, AdamW) on (a) the inputs as packed (NCHW) and (b)
   ``train_head.conv_layout`` inputs (channels-last), what stage 5 does now;
2. variance network: one step on a frozen head's logits with the 16-sample logit-noise loss,
   (a) NCHW and the loss written as plain autograd (``reference_mc_loss``, the old code), (b)
   channels-last and ``losses.McLogitNoiseLoss`` (gradient in closed form);
3. fusion module on the demo backbone (one synthetic image, ``--rows-per-image`` prompt sets):
   one training step (forward and backward through the frozen decoder) of (a) one refinement
   pass per row (the old loop) and (b) ``fusion.refinement_step``: one decoder call per image.

Each figure is the best of ``--repeats`` timed steps after one warm-up step, in ms per row, with
the ratio a/b (how many times faster the current path is).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.sam.prompting import PROMPT_MODES  # noqa: E402
from modules.sam.registry import load_backbone  # noqa: E402
from modules.stages.train_head import conv_layout  # noqa: E402
from modules.training.losses import BceDiceLoss, FocalDiceIouLoss, McLogitNoiseLoss  # noqa: E402
from modules.training.models import PromptAwareHead, UncertaintyFusion, VarianceNetwork  # noqa: E402
from modules.uncertainty.fusion import collate_images, make_uncertainty_source, refine, refinement_step  # noqa: E402

CHECKPOINT = REPO / "assets" / "demo_backbone" / "demo_tiny.pt"


def timed(step, repeats: int) -> float:
    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def reference_mc_loss(map_logits, log_var, target, num_samples: int = 16):
    """The logit-noise loss as plain autograd (the code before the closed-form gradient)."""
    logits = map_logits.float().detach()
    sigma = torch.exp(0.5 * log_var)
    noise = torch.randn((num_samples, *logits.shape))
    noisy = logits.unsqueeze(0) + sigma.unsqueeze(0) * noise
    log_likelihood = -F.binary_cross_entropy_with_logits(noisy, target.unsqueeze(0).expand_as(noisy), reduction="none")
    return (math.log(num_samples) - torch.logsumexp(log_likelihood, dim=0)).mean()


def optimizer_step(model, loss_of):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_of().backward()
        optimizer.step()

    return step


def bench_head(inputs, target, repeats):
    head, loss_fn = PromptAwareHead(), BceDiceLoss()
    old = optimizer_step(head, lambda: loss_fn(head(inputs.float()), target))
    new = optimizer_step(head, lambda: loss_fn(head(conv_layout(inputs.float())), target))
    return timed(old, repeats), timed(new, repeats)


def bench_variance(inputs, target, repeats):
    head = PromptAwareHead().eval().requires_grad_(False)
    network = VarianceNetwork()
    loss_fn = McLogitNoiseLoss(16)

    def loss(layout, mc_loss):
        def compute():
            x = layout(inputs.float())
            with torch.no_grad():
                map_logits = head(x)
            return mc_loss(map_logits, network(VarianceNetwork.build_inputs(x, map_logits)), target)
        return compute

    old = optimizer_step(network, loss(lambda x: x, reference_mc_loss))
    new = optimizer_step(network, loss(conv_layout, loss_fn))
    return timed(old, repeats), timed(new, repeats)


def bench_fusion(rows, repeats):
    backbone = load_backbone("sam", "demo_tiny", CHECKPOINT, "cpu")
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 200, 240, generator=generator)
    features = {name: value[0] for name, value in backbone.encode(backbone.preprocess(image.mul(255).byte()
                                                                                       .permute(1, 2, 0).numpy())[None]).items()}
    hw = (200, 240)
    points = torch.rand(rows, 3, 2, generator=generator) * torch.tensor([240.0, 200.0])
    labels = torch.randint(0, 2, (rows, 3), generator=generator)
    inputs = torch.randn(rows, 3, 256, 256, generator=generator).clamp(-20, 20)
    target = (torch.rand(rows, 1, 256, 256, generator=generator) > 0.5).float()
    boxes = torch.zeros(rows, 4)
    fusion, loss_fn = UncertaintyFusion().train(), FocalDiceIouLoss()
    source = make_uncertainty_source("raw_sam_entropy")

    def per_row_loss():
        uncertainty = source(inputs)[:, None]
        logits, ious = [], []
        for r in range(rows):
            prompts = PROMPT_MODES["points"](points[r:r + 1], labels[r:r + 1], boxes[r:r + 1])
            refined, iou = refine(backbone, fusion, features, hw, prompts, inputs[r:r + 1, 0:1], uncertainty[r:r + 1],
                                  enable_grad=True)
            logits.append(refined)
            ious.append(iou)
        return loss_fn(torch.cat(logits), target, torch.cat(ious)[:, 0])

    batch = collate_images([{"inputs": inputs, "target": target, "features": features, "point_coords": points,
                             "point_labels": labels, "box": boxes, "original_hw": torch.tensor(hw)}])
    step_fn = refinement_step(backbone, "points", "single", source, loss_fn)
    old = optimizer_step(fusion, per_row_loss)
    new = optimizer_step(fusion, lambda: step_fn(fusion, batch)[0])
    return timed(old, repeats), timed(new, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows-per-image", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated: head, variance, fusion")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    skip = set(filter(None, args.skip.split(",")))
    inputs = torch.randn(args.batch_size, 3, 256, 256).clamp(-20, 20).half()
    target = (torch.rand(args.batch_size, 1, 256, 256) > 0.5).float()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| model | rows per step | (a) old ms/row | (b) current ms/row | a/b |")
    print("|---|---|---|---|---|")
    cases = [("head", args.batch_size, lambda: bench_head(inputs, target, args.repeats)),
             ("variance", args.batch_size, lambda: bench_variance(inputs, target, args.repeats)),
             ("fusion", args.rows_per_image, lambda: bench_fusion(args.rows_per_image, args.repeats))]
    for name, rows, run in cases:
        if name in skip:
            continue
        old, new = run()
        print(f"| {name} | {rows} | {1000 * old / rows:.1f} | {1000 * new / rows:.1f} | {old / new:.2f} |", flush=True)


if __name__ == "__main__":
    main()
