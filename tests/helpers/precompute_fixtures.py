"""Tiny projects and random-weight checkpoints for the stage-3 tests and the benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.stage_runner import run_stage, write_config


def save_random_checkpoint(family: str, model_type: str, path: Path, seed: int = 0) -> Path:
    """A state dict of the registered model with seeded random weights (no download)."""
    from modules.sam.registry import build_sam_model

    torch.manual_seed(seed)
    model = build_sam_model(family, model_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_tiny_dataset(root: Path, groups=("cats", "dogs"), per_group: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """Small noisy images (56-88 px) with one disc each: images/<group>/<stem>.png, masks/..."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    for group in groups:
        (images / group).mkdir(parents=True, exist_ok=True)
        (masks / group).mkdir(parents=True, exist_ok=True)
        for i in range(per_group):
            h, w = int(rng.integers(56, 88)), int(rng.integers(56, 88))
            yy, xx = np.mgrid[:h, :w]
            cy, cx, r = h // 2 + int(rng.integers(-6, 6)), w // 2 + int(rng.integers(-6, 6)), int(rng.integers(10, 18))
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            image = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
            image[mask] += 100
            Image.fromarray(image).save(images / group / f"s{i:02d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(masks / group / f"s{i:02d}.png")
    return images, masks


def make_project(folder: Path, per_group: int = 3, overrides: dict | None = None) -> Path:
    """Data, stage 1 and stage 2 in ``folder``; returns the config path."""
    images, masks = write_tiny_dataset(folder / "data", per_group=per_group)
    merged = {"sam": {"num_workers": 0, "encoder_batch_size": 2, "device": "cpu"}}
    for section, values in (overrides or {}).items():
        merged.setdefault(section, {}).update(values)
    config = write_config(folder, images, masks, merged)
    run_stage("build_manifests.py", config)
    run_stage("generate_promptsets.py", config)
    return config
