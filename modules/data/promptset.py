"""Seeded point/box prompt sets per sample, and the Gaussian prompt maps built from them.

Prompts are stored in ORIGINAL pixel coordinates and in FRAME256; every record pads its point
lists to one canonical ``point_width`` so a prompt set decodes the same alone or batched; each
prompt set draws from its own seed derived from the sample id (``sample_key``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from modules.core.frames import FRAME256
from modules.core.paths import promptset_path

FORMAT_VERSION = 2


def sample_key(sample_id: str) -> int:
    """A stable 63-bit integer from a sample id (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(sample_id.encode("utf-8")).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt set is drawn from (the ``prompt_generation`` config section)."""

    min_pairs: int
    max_pairs: int
    prompt_seed: int
    gaussian_sigma: float
    box_jitter: float


def point_width(spec: PromptSpec) -> int:
    """The canonical padded length of every prompt set's point list.

    SAM's decoder attends to padding points (label -1), so a prompt set decoded in a batch padded
    to another length would give other logits; ``2 * max_pairs + 1`` leaves at least one padding
    point, as SAM's own predictor adds for point-only prompts.
    """
    return 2 * spec.max_pairs + 1


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the foreground, inclusive pixel indices. ``mask``: H x W bool."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def to_frame256_points(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """``N x 2`` original (x, y) pixel coordinates -> FRAME256 coordinates."""
    scale = np.array([FRAME256 / width, FRAME256 / height])
    return (np.asarray(points, dtype=np.float64) + 0.5) * scale - 0.5


def frame256_to_pixels(points_256: np.ndarray, height: int, width: int) -> np.ndarray:
    """``N x 2`` FRAME256 (x, y) -> the ORIGINAL pixels (x, y) ``N x 2`` int64 they fall in (the
    inverse of ``to_frame256_points``, rounded to the nearest pixel and kept inside the image)."""
    scale = np.array([width / FRAME256, height / FRAME256])
    pixels = np.rint((np.asarray(points_256, dtype=np.float64).reshape(-1, 2) + 0.5) * scale - 0.5)
    return np.clip(pixels, 0, [width - 1, height - 1]).astype(np.int64)


def to_frame256_box(box, height: int, width: int) -> list[float]:
    x0, y0, x1, y1 = box
    sx, sy = FRAME256 / width, FRAME256 / height
    return [x0 * sx, y0 * sy, (x1 + 1) * sx, (y1 + 1) * sy]


def _sample_pixels(rng: np.random.Generator, flat_indices: np.ndarray, count: int) -> np.ndarray:
    replace = flat_indices.size < count
    return rng.choice(flat_indices, size=count, replace=replace)


def draw_promptset(mask: np.ndarray, spec: PromptSpec, seed: np.random.SeedSequence) -> dict:
    """One prompt set: ``k`` positive points on the foreground, ``k`` negatives on the background,
    and the tight box with optional jitter. ``mask``: H x W bool (at image resolution)."""
    rng = np.random.default_rng(seed)
    height, width = mask.shape
    flat = mask.ravel()
    foreground = np.flatnonzero(flat)
    background = np.flatnonzero(~flat)
    k = int(rng.integers(spec.min_pairs, spec.max_pairs + 1))
    positives = _sample_pixels(rng, foreground, k)
    negatives = _sample_pixels(rng, background, k)
    flat_points = np.concatenate([positives, negatives])
    points = np.stack([flat_points % width, flat_points // width], axis=1).astype(np.int64)

    x0, y0, x1, y1 = tight_box(mask)
    if spec.box_jitter > 0:
        side = np.array([x1 - x0 + 1, y1 - y0 + 1, x1 - x0 + 1, y1 - y0 + 1], dtype=np.float64)
        noise = rng.uniform(-1.0, 1.0, size=4) * spec.box_jitter * side
        jittered = np.round(np.array([x0, y0, x1, y1]) + noise).astype(np.int64)
        x0, x1 = sorted(np.clip(jittered[[0, 2]], 0, width - 1).tolist())
        y0, y1 = sorted(np.clip(jittered[[1, 3]], 0, height - 1).tolist())
    box = [int(x0), int(y0), int(x1), int(y1)]
    return {
        "k": k,
        "points": points.tolist(),
        "labels": [1] * k + [0] * k,
        "box": box,
        "points_256": np.round(to_frame256_points(points, height, width), 4).tolist(),
        "box_256": [round(v, 4) for v in to_frame256_box(box, height, width)],
    }


def build_promptset_record(sample: dict, split: str, mask: np.ndarray, num_sets: int,
                           spec: PromptSpec, source: dict) -> dict:
    """The JSON document of one sample: ``num_sets`` prompt sets plus what they came from."""
    key = sample_key(sample["sample_id"])
    sets = []
    for index in range(num_sets):
        seed = np.random.SeedSequence((spec.prompt_seed, key, index))
        sets.append({"promptset_id": index, "seed_entropy": [spec.prompt_seed, key, index],
                     **draw_promptset(mask, spec, seed)})
    return {
        "format_version": FORMAT_VERSION,
        "sample_id": sample["sample_id"],
        "safe_id": sample["safe_id"],
        "split": split,
        "image_h": int(mask.shape[0]),
        "image_w": int(mask.shape[1]),
        "frame": FRAME256,
        "gaussian_sigma": spec.gaussian_sigma,
        "point_width": point_width(spec),
        "source": source,
        "promptsets": sets,
    }


def clicked_promptset(points, labels, box, height: int, width: int, promptset_id: int = 0) -> dict:
    """A prompt set from a person's (or a simulated annotator's) clicks, with the fields of a drawn
    one: ``points`` ``N x 2`` (x, y) ORIGINAL pixels, ``labels`` ``N`` (1 positive, 0 negative),
    ``box`` ``(x0, y0, x1, y1)`` ORIGINAL pixels or None (then the whole image, which only the box
    prompt modes read)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    labels = [int(v) for v in np.asarray(labels).reshape(-1)]
    if len(labels) != points.shape[0] or any(v not in (0, 1) for v in labels):
        raise ValueError(f"clicks: {points.shape[0]} points need as many labels, each 0 or 1 (got {labels})")
    box = [0, 0, width - 1, height - 1] if box is None else [float(v) for v in box]
    return {
        "promptset_id": int(promptset_id),
        "points": points.tolist(),
        "labels": labels,
        "box": box,
        "points_256": np.round(to_frame256_points(points, height, width), 4).tolist(),
        "box_256": [round(v, 4) for v in to_frame256_box(box, height, width)],
    }


def clicked_record(sample_id: str, safe_id: str, image_hw: tuple[int, int], promptsets: list[dict],
                   gaussian_sigma: float, min_point_width: int, split: str = "interactive") -> dict:
    """A prompt-set record (as stage 2 writes) around ``clicked_promptset`` sets. Its ``point_width``
    is ``min_point_width`` (the pipeline's canonical width, ``point_width``), or more where a set
    has more clicks, always leaving one padding point."""
    widest = max((len(s["labels"]) for s in promptsets), default=0)
    return {
        "format_version": FORMAT_VERSION,
        "sample_id": sample_id,
        "safe_id": safe_id,
        "split": split,
        "image_h": int(image_hw[0]),
        "image_w": int(image_hw[1]),
        "frame": FRAME256,
        "gaussian_sigma": float(gaussian_sigma),
        "point_width": max(int(min_point_width), widest + 1),
        "source": {"clicks": True},
        "promptsets": promptsets,
    }


def dumps_record(record: dict) -> str:
    """Canonical JSON text: the same record always gives the same bytes."""
    return json.dumps(record, sort_keys=True, indent=1) + "\n"


# --------------------------------------------------------------------------- prompt maps


def gaussian_prompt_maps(points_256: torch.Tensor, labels: torch.Tensor, sigma: float,
                         size: int = FRAME256) -> torch.Tensor:
    """Positive and negative prompt maps in FRAME256.

    Args:
        points_256: ``P x N x 2`` (x, y) coordinates in the ``size x size`` frame.
        labels: ``P x N``; 1 positive, 0 negative, anything else (e.g. -1 padding) ignored.
        sigma: Gaussian standard deviation in pixels of that frame.
    Returns:
        ``P x 2 x size x size`` float32: channel 0 the sum of the positive points' Gaussians
        (peak 1 at each point), channel 1 the negatives', each clamped to [0, 1].
    """
    points_256 = points_256.to(torch.float32)
    grid = torch.arange(size, dtype=torch.float32, device=points_256.device)
    dx2 = (grid.view(1, 1, size) - points_256[..., 0:1]) ** 2  # P x N x W
    dy2 = (grid.view(1, 1, size) - points_256[..., 1:2]) ** 2  # P x N x H
    gx = torch.exp(-dx2 / (2 * sigma**2))
    gy = torch.exp(-dy2 / (2 * sigma**2))
    maps = []
    for label in (1, 0):
        weight = (labels == label).to(torch.float32)  # P x N
        # Separable Gaussians: sum_n w_n * gy_n(y) * gx_n(x) as one batched matmul.
        summed = torch.einsum("pn,pny,pnx->pyx", weight, gy, gx)
        maps.append(summed.clamp_(0.0, 1.0))
    return torch.stack(maps, dim=1)


def promptset_tensors(record: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All prompt sets of one record, padded to the record's canonical ``point_width`` N: points
    ``P x N x 2`` (original coords), labels ``P x N`` (-1 = padding), points_256 ``P x N x 2``,
    boxes ``P x 4`` (original coords)."""
    sets = record["promptsets"]
    width = record.get("point_width") or max(len(s["labels"]) for s in sets) + 1
    count = len(sets)
    points = torch.zeros(count, width, 2)
    points_256 = torch.zeros(count, width, 2)
    labels = torch.full((count, width), -1, dtype=torch.int64)
    for i, s in enumerate(sets):
        n = len(s["labels"])
        if n == 0:  # a box alone (the click simulation's ``start: box``): every point is padding
            continue
        points[i, :n] = torch.tensor(s["points"], dtype=torch.float32)
        points_256[i, :n] = torch.tensor(s["points_256"], dtype=torch.float32)
        labels[i, :n] = torch.tensor(s["labels"])
    boxes = torch.tensor([s["box"] for s in sets], dtype=torch.float32)
    return points, labels, points_256, boxes


# --------------------------------------------------------------------------- reading stage 2


def load_promptsets(project_root, split: str, safe_id: str) -> dict:
    """The stage-2 record of one sample (read by every later stage through this function)."""
    return json.loads(promptset_path(project_root, split, safe_id).read_text(encoding="utf-8"))
