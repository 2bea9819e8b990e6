"""Mask-decoder calls of a few prompt sets against one call of all of them (``sam.decoder_batch``).

``Backbone.decode`` runs an image's P prompt sets through SAM's mask decoder in calls of at most
``decoder_batch`` prompt sets (0 = one call). For each backbone (the bundled demo checkpoint, and
SAM 2.1 hiera_t with random weights saved to a file and loaded through the same loader) and each P,
this times ``decode`` of P prompt sets (three points each) on one image's features: one call of all
P (the baseline, measured in this run) and calls of each ``--sizes`` value, and prints the time per
prompt set and its ratio to the baseline (below 1 = the split is faster). On CUDA, ``decode`` runs
under bf16 autocast as everywhere in the pipeline, and each timing waits for the device.

    python benchmarks/bench_decoder_batch.py [--device cpu] [--promptsets 4 10 40] [--sizes 2 4 6 8]
           [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import best_of  # noqa: E402
from modules.sam.fast_encoder import EncoderSettings  # noqa: E402
from modules.sam.registry import build_sam_model, load_backbone  # noqa: E402

DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "demo_backbone" / "demo_tiny.pt"
IMAGE_HW = (300, 320)


def backbones(folder: Path, device: str) -> dict[str, object]:
    """The demo backbone from its checkpoint, and hiera_t with random weights from a file (the
    reference encoder, uncompiled: only its one encode per backbone feeds the timed decoder)."""
    torch.manual_seed(0)
    random_weights = folder / "hiera_t.pt"
    torch.save(build_sam_model("sam2", "hiera_t").state_dict(), random_weights)
    encoder = EncoderSettings("reference", False)
    return {"sam demo_tiny": load_backbone("sam", "demo_tiny", DEMO_CHECKPOINT, device, encoder),
            "sam2 hiera_t (random weights)": load_backbone("sam2", "hiera_t", random_weights, device, encoder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--promptsets", type=int, nargs="+", default=[4, 10, 40], help="P per decode")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 6, 8], help="decoder_batch values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
          f"decode on {where}, best of {args.repeats}; ratio = time per prompt set / one call's")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        for name, backbone in backbones(Path(folder), args.device).items():
            features = backbone.encode(backbone.preprocess(image)[None])
            for num_sets in args.promptsets:
                points = torch.from_numpy(rng.uniform(0, min(IMAGE_HW), (num_sets, 3, 2))).float().to(device)
                labels = torch.ones(num_sets, 3, dtype=torch.int64, device=device)

                def decode() -> None:
                    backbone.decode(features, IMAGE_HW, points, labels)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)

                backbone.configure_decoder(0)
                decode()  # warm-up
                baseline = best_of(args.repeats, decode) / num_sets
                cells = [f"one call {baseline * 1000:.1f} ms"]
                for size in (size for size in args.sizes if size < num_sets):
                    backbone.configure_decoder(size)
                    per_set = best_of(args.repeats, decode) / num_sets
                    cells.append(f"{size}: {per_set * 1000:.1f} ms ({per_set / baseline:.2f}x)")
                print(f"{name}, P = {num_sets}, per prompt set: " + ", ".join(cells))


if __name__ == "__main__":
    main()
