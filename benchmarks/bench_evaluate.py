"""Evaluation-stage cost of the sampling strategies against the passes they are built from, one run.

On one synthetic image (a bright disk on noise) with P prompt sets, same backbone, same inputs:

1. prompt perturbation, K variants (``PromptPerturbationStrategy.predict``: one batched decoder call
   on the cached embedding) against
   (a) one decoder call with the P original prompt sets (``tta.decode_selected_logits``),
   (b) one decoder call with the K x P perturbed prompt sets already built (the batched floor),
   (c) K encoder passes (what re-encoding per variant would cost);
2. Laplace with S weight samples (``LaplaceStrategy.predict``) against one forward of the head;
3. TTA with K transforms (``TTAStrategy.predict``, clean pass from the cache) against K encoder
   passes of the same augmented images (``backbone.encode`` in batches of ``--encoder-batch-size``).

Each figure is the best of ``--repeats`` timed calls after one warm-up call.

Usage: python benchmarks/bench_evaluate.py [--family sam --model-type demo_tiny] [--skip laplace,...]
       [--promptsets 4] [--pp-samples 10] [--laplace-samples 32] [--tta hflip,vflip,rot90,...]
       [--device cpu] [--threads 2]
The demo backbone uses the shipped checkpoint; other models (``--model-type vit_b``, ``hiera_t``) get
seeded random weights saved to a file and loaded by the pipeline's loader (timings do not depend on them).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.sam.fast_encoder import EncoderSettings  # noqa: E402
from modules.sam.registry import build_sam_model, load_backbone  # noqa: E402
from modules.laplace.head import LastLayerPosterior  # noqa: E402
from modules.training.models import PromptAwareHead  # noqa: E402
from modules.uncertainty.prompt_perturbation import perturbed_prompts  # noqa: E402
from modules.data.promptset import PromptSpec, build_promptset_record  # noqa: E402
from modules.cache.sam_cache import CacheEntry  # noqa: E402
from modules.sam.prompting import round_features  # noqa: E402
from modules.uncertainty.tta import build_transforms, decode_selected_logits, transform_rng  # noqa: E402
from modules.uncertainty.strategies import (EvalSample, LaplaceStrategy, PromptPerturbationStrategy,  # noqa: E402
                                 TTAStrategy)

DEFAULT_CHECKPOINT = REPO / "assets" / "demo_backbone" / "demo_tiny.pt"
DEFAULT_TTA = "hflip,vflip,rot90,rescale_0.75,brightness,contrast,hue"
PROMPT_MODE, MULTIMASK_POLICY = "points", "best_iou"
LOGIT_CLIP = 20.0


def synchronize() -> None:
    """Wait for queued CUDA work (kernels run asynchronously); nothing on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


#: ``--clock``: wall time, or process CPU time (not inflated by other jobs on a shared CPU; with one
#: torch thread it is the call's own work; meaningless on CUDA).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def best_time(function: Callable[[], object], repeats: int) -> float:
    """Best time in seconds (``clock``) of ``repeats`` calls after one warm-up call; on CUDA the
    clock stops only after the device has finished."""
    function()
    times = []
    for _ in range(repeats):
        synchronize()
        started = clock()
        function()
        synchronize()
        times.append(clock() - started)
    return min(times)


def load_bench_backbone(family: str, model_type: str, checkpoint: Path, device: str,
                        encoder: EncoderSettings | None = None):
    """The shipped demo checkpoint, or (other models, or no file) seeded random weights saved to a
    file and loaded through the pipeline's loader; timings do not depend on the weights."""
    if checkpoint.is_file() and (family, model_type) == ("sam", "demo_tiny"):
        return load_backbone(family, model_type, checkpoint, device, encoder), str(checkpoint)
    path = Path(tempfile.mkdtemp()) / f"{model_type}_random.pt"
    torch.manual_seed(0)
    torch.save(build_sam_model(family, model_type).state_dict(), path)
    return load_backbone(family, model_type, path, device, encoder), "random weights"


def synthetic_sample(backbone, height: int, width: int, num_promptsets: int) -> EvalSample:
    """One image with its cache entry (encoded and decoded here) and prompt sets."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width]
    mask = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 4) ** 2
    image = rng.integers(0, 150, (height, width, 3), dtype=np.uint8)
    image[mask] += 90
    spec = PromptSpec(min_pairs=1, max_pairs=4, prompt_seed=7, gaussian_sigma=8.0, box_jitter=0.0)
    record = build_promptset_record({"sample_id": "bench/0", "safe_id": "bench__0"}, "test", mask, num_promptsets,
                                    spec, source={})
    features = round_features(backbone.encode(backbone.preprocess(image)[None]))
    feature_arrays = {name: value[0].cpu().numpy() for name, value in features.items()}
    probe = EvalSample.build("bench__0", "bench", CacheEntry(
        "bench__0", "test", feature_arrays, np.zeros((num_promptsets, 256, 256), np.float16),
        np.arange(num_promptsets, dtype=np.int32), np.zeros(num_promptsets, np.int8),
        np.zeros((num_promptsets, 3), np.float32), (height, width), backbone.input_size((height, width)), "0" * 32,
    ), record, LOGIT_CLIP)
    logits = decode_selected_logits(backbone, features, (height, width), probe.points, probe.labels, probe.boxes,
                                    PROMPT_MODE, MULTIMASK_POLICY)
    probe.cache_entry.logits = logits.cpu().numpy().astype(np.float16)
    return EvalSample.build("bench__0", "bench", probe.cache_entry, record, LOGIT_CLIP,
                            image_loader=lambda: image)


def bench_prompt_perturbation(backbone, sample: EvalSample, num_samples: int, repeats: int) -> dict:
    features = sample.features(backbone.device)
    strategy = PromptPerturbationStrategy(backbone, num_samples, PROMPT_MODE, MULTIMASK_POLICY, seed=0)
    all_points, all_labels, all_boxes = perturbed_prompts(sample.points, sample.labels, sample.boxes,
                                                          sample.original_hw, num_samples, 0, sample.sample_key)
    image = sample.image
    pixels = backbone.preprocess(image)[None]
    timings = {
        "strategy": best_time(lambda: strategy.predict(sample), repeats),
        "one_decoder_pass": best_time(lambda: decode_selected_logits(
            backbone, features, sample.original_hw, sample.points, sample.labels, sample.boxes, PROMPT_MODE,
            MULTIMASK_POLICY), repeats),
        "batched_decoder_floor": best_time(lambda: decode_selected_logits(
            backbone, features, sample.original_hw, all_points, all_labels, all_boxes, PROMPT_MODE,
            MULTIMASK_POLICY), repeats),
        "one_encoder_pass": best_time(lambda: backbone.encode(pixels), repeats),
    }
    return {
        "K": num_samples, **{f"{k}_s": round(v, 4) for k, v in timings.items()},
        "ratio_vs_one_decoder_pass": timings["strategy"] / timings["one_decoder_pass"],
        "ratio_vs_batched_floor": timings["strategy"] / timings["batched_decoder_floor"],
        "ratio_vs_K_encoder_passes": timings["strategy"] / (num_samples * timings["one_encoder_pass"]),
    }


def bench_laplace(sample: EvalSample, num_samples: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    head = PromptAwareHead(channels_in=3, hidden_channels=16).to(device).eval()
    weights = head.final_conv.in_channels + 1
    posterior = LastLayerPosterior(head, torch.randn(weights) * 0.1, torch.full((weights,), 0.05), 1.0)
    strategy = LaplaceStrategy(posterior, num_samples, seed=0)
    inputs = sample.head_inputs.to(device)

    def head_forward():
        with torch.inference_mode():
            return head(inputs)

    timings = {"strategy": best_time(lambda: strategy.predict(sample), repeats),
               "one_head_forward": best_time(head_forward, repeats)}
    return {"S": num_samples, **{f"{k}_s": round(v, 4) for k, v in timings.items()},
            "ratio_vs_one_head_forward": timings["strategy"] / timings["one_head_forward"]}


def bench_tta(backbone, sample: EvalSample, transform_names: list[str], encoder_batch_size: int,
              repeats: int) -> dict:
    transforms = build_transforms(transform_names)
    strategy = TTAStrategy(backbone, transforms, PROMPT_MODE, MULTIMASK_POLICY, encoder_batch_size, seed=0,
                           reuse_cached_features=True)
    image = sample.image
    augmented = [backbone.preprocess(t.apply_image(image, transform_rng(0, sample.sample_key, i) if t.random else None))
                 for i, t in enumerate(transforms)]

    def encoder_only():
        for start in range(0, len(augmented), encoder_batch_size):
            backbone.encode(torch.stack(augmented[start:start + encoder_batch_size]))

    timings = {"strategy": best_time(lambda: strategy.predict(sample), repeats),
               "K_encoder_passes": best_time(encoder_only, repeats)}
    return {"K": len(transforms), **{f"{k}_s": round(v, 4) for k, v in timings.items()},
            "ratio_vs_K_encoder_passes": timings["strategy"] / timings["K_encoder_passes"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sam", help="sam or sam2")
    parser.add_argument("--model-type", default="demo_tiny", help="e.g. demo_tiny, vit_b, hiera_t")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="used for demo_tiny")
    parser.add_argument("--skip", default="", help="comma-separated strategies not to time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--promptsets", type=int, default=4)
    parser.add_argument("--pp-samples", type=int, default=10)
    parser.add_argument("--laplace-samples", type=int, default=32)
    parser.add_argument("--tta", default=DEFAULT_TTA, help="comma-separated transforms (the clean pass is added)")
    parser.add_argument("--encoder-batch-size", type=int, default=4)
    parser.add_argument("--encoder-impl", default="auto", help="sam.encoder_impl: auto, reference or fast")
    parser.add_argument("--compile-encoder", default="auto", choices=["auto", "true", "false"],
                        help="sam.compile_encoder (compiling costs minutes on a large encoder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)

    compile_encoder = {"true": True, "false": False}.get(args.compile_encoder, args.compile_encoder)
    encoder = EncoderSettings(args.encoder_impl, compile_encoder, args.encoder_batch_size)
    backbone, weights = load_bench_backbone(args.family, args.model_type, args.checkpoint, args.device, encoder)
    sample = synthetic_sample(backbone, args.height, args.width, args.promptsets)
    benches = {
        "prompt_perturbation": lambda: bench_prompt_perturbation(backbone, sample, args.pp_samples, args.repeats),
        "laplace": lambda: bench_laplace(sample, args.laplace_samples, args.repeats, args.device),
        "tta": lambda: bench_tta(backbone, sample, [n for n in args.tta.split(",") if n], args.encoder_batch_size,
                                 args.repeats),
    }
    skipped = {name for name in args.skip.split(",") if name}
    results = {name: bench() for name, bench in benches.items() if name not in skipped}
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"device {args.device}; backbone {args.family}/{args.model_type} ({weights}); image {args.height} x {args.width}, "
          f"P = {args.promptsets} prompt sets; best of {args.repeats}, {args.clock} clock")
    goals = {"prompt_perturbation": ("ratio_vs_one_decoder_pass", 2.0), "laplace": ("ratio_vs_one_head_forward", 2.0),
             "tta": ("ratio_vs_K_encoder_passes", 1.15)}
    for name, figures in results.items():
        key, goal = goals[name]
        text = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        print(f"{name}: {text}  [goal {key} <= {goal}: {'met' if figures[key] <= goal else 'NOT met'}]")
    return results


if __name__ == "__main__":
    main()
