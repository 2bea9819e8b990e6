"""Sanity panels from the SAM cache (``visualize_sanity.py``): what stage 3 stored, one PNG per sample."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the non-interactive backend)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from modules.cache.training_index import open_cache  # noqa: E402
from modules.core.errors import PipelineError  # noqa: E402
from modules.core.fileio import atomic_path  # noqa: E402
from modules.core.frames import FRAME256  # noqa: E402
from modules.data.imageio import read_image_rgb, read_mask  # noqa: E402
from modules.data.promptset import gaussian_prompt_maps, load_promptsets, promptset_tensors  # noqa: E402
from modules.data.sample_files import split_samples  # noqa: E402

log = logging.getLogger("pipeline")


def sanity_figsize(image_hw: tuple[int, int], n_panels: int, panel_width: float = 3.0) -> tuple[float, float]:
    """Figure size (inches) of ``n_panels`` side by side, each at the ``(H, W)`` image's aspect ratio."""
    height, width = image_hw
    return n_panels * panel_width, panel_width * height / max(width, 1) + 0.6


def write_sanity_panels(ctx, split: str, count: int) -> list[Path]:
    """Six-panel PNGs (image + prompts, ground truth, SAM mask = logits > 0, SAM logits,
    positive and negative prompt maps) for the first ``count`` cached samples of ``split``."""
    cfg = ctx.cfg
    cache = open_cache(cfg)
    rows = {r["safe_id"]: r for r in split_samples(cfg, split).to_dict("records")}
    chosen = [s for s in cache.sample_ids(split) if s in rows][:count]
    if not chosen:
        raise PipelineError(f"{cache.folder}: no cached sample of split {split!r}")
    written = []
    for safe_id in chosen:
        row, entry = rows[safe_id], cache.entry(safe_id)
        record = load_promptsets(cfg.project_root, split, safe_id)
        _, labels, points_256, _ = promptset_tensors(record)
        maps = gaussian_prompt_maps(points_256[:1], labels[:1], cfg.prompt_generation.gaussian_sigma)[0]
        image = np.asarray(Image.fromarray(read_image_rgb(row["image_path"])).resize((FRAME256, FRAME256), Image.BILINEAR))
        truth = read_mask(row["mask_path"], threshold=cfg.data.mask_threshold)
        truth = np.asarray(Image.fromarray(truth.astype(np.uint8) * 255).resize((FRAME256, FRAME256), Image.NEAREST)) > 0
        logits = entry.logits[0].astype(np.float32)
        valid = labels[0] >= 0
        pts, lab = points_256[0][valid].numpy(), labels[0][valid].numpy()
        panels = [(image, "image + prompts", None), (truth, "ground truth", "gray"),
                  (logits > 0, "SAM mask (logits > 0)", "gray"), (logits, "SAM logits", "coolwarm"),
                  (maps[0].numpy(), "positive map", "viridis"), (maps[1].numpy(), "negative map", "viridis")]
        image_hw = (int(row["image_h"]), int(row["image_w"]))
        figure, axes = plt.subplots(1, len(panels), figsize=sanity_figsize(image_hw, len(panels)))
        for axis, (array, title, cmap) in zip(axes, panels):
            # FRAME256 stretches the image to a square; drawn back at the image's own aspect ratio
            shown = axis.imshow(array, cmap=cmap, aspect=image_hw[0] / image_hw[1])
            if title == "SAM logits":
                limit = float(np.abs(logits).max()) or 1.0
                shown.set_clim(-limit, limit)
                figure.colorbar(shown, ax=axis, fraction=0.046, shrink=min(1.0, image_hw[0] / image_hw[1]))
            axis.set_title(title, fontsize=9)
            axis.axis("off")
        axes[0].scatter(pts[lab == 1, 0], pts[lab == 1, 1], c="lime", s=18, marker="o", edgecolors="black")
        axes[0].scatter(pts[lab == 0, 0], pts[lab == 0, 1], c="red", s=18, marker="x")
        figure.suptitle(f"{split} / {row['sample_id']} ({image_hw[1]} x {image_hw[0]} px)  prompt set "
                        f"{int(entry.promptset_ids[0])}, branch {int(entry.branch_index[0])}, "
                        f"IoU pred {[round(float(v), 3) for v in entry.iou_predictions[0]]}", fontsize=9)
        path = ctx.output_dir / f"{split}__{safe_id}.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=80, bbox_inches="tight", format="png")
        plt.close(figure)
        ctx.tracker.log_image(f"debug_panels/{safe_id}", path)
        written.append(path)
    log.info(f"[visualize_sanity] {len(written)} panels -> {ctx.output_dir}")
    return written
