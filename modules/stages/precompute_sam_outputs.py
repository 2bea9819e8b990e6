"""Stage 3: run the frozen SAM once per image and cache what later stages need.

Per image: the float16 encoder features and, per prompt set, the FRAME256 logits of the output
``sam.multimask_policy`` keeps with all predicted IoUs (layout: ``modules/cache/sam_cache.py``).
DataLoader workers read images and prompt sets, the encoder runs on batches, each image's prompt
sets go through ONE decoder call, and a writer process (``modules/cache/cache_writers.py``) writes
each batch while the next is encoded. Features are rounded to float16 BEFORE decoding, so
re-decoding the cache reproduces the stored logits.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from modules.cache import sam_cache, shard_writer
from modules.cache.cache_writers import CACHE_WRITERS
from modules.cache.entries import EntryRequest, HostArray, decoded_entries, record_prompts
from modules.core.config import PipelineConfig
from modules.core.errors import error_line
from modules.core.fileio import cached_file_md5
from modules.core.paths import FINGERPRINT_FILE, cache_dir, promptset_path
from modules.core.processes import DieWithParent
from modules.core.progress import Progress
from modules.core.stage import Shard, UnitCounts
from modules.data.imageio import ImageReadError, read_image_rgb
from modules.data.manifest import SPLITS
from modules.data.promptset import load_promptsets
from modules.data.sample_files import split_samples
from modules.sam.prompting import MULTIMASK_POLICIES, Prompts, round_features
from modules.sam.registry import check_registered, configured_checkpoint_md5, load_configured_backbone

log = logging.getLogger("pipeline.precompute")

# --------------------------------------------------------------------------- units


@dataclass(frozen=True)
class CacheUnit:
    """One image of one split (a row of the split manifest)."""

    split: str
    safe_id: str
    sample_id: str
    image_path: str


def list_units(cfg: PipelineConfig) -> list[CacheUnit]:
    """Every sample of every split, in a fixed order (split order, then manifest order)."""
    units = []
    for split in SPLITS:
        for row in split_samples(cfg, split).to_dict("records"):
            units.append(CacheUnit(split, str(row["safe_id"]), str(row["sample_id"]), str(row["image_path"])))
    return units


def promptset_md5(project_root: Path, unit: CacheUnit) -> str | None:
    """md5 of the unit's prompt-set JSON, None when the file is missing."""
    path = promptset_path(project_root, unit.split, unit.safe_id)
    return cached_file_md5(path) if path.is_file() else None


# --------------------------------------------------------------------------- loading (workers)


@dataclass
class LoadedImage:
    """What a DataLoader worker hands to the encoder loop for one unit.

    ``pixels``: the preprocessor's ``prepare`` half, uint8 (None on error): the float half runs on
    the encoding device, so workers hand over at least 4x fewer bytes; ``points`` ``P x N x 2``,
    ``labels`` ``P x N`` (-1 padding), ``boxes`` ``P x 4``, all in the ORIGINAL frame.

    The arrays are numpy, not torch: they cross the worker queue pickled by value, where a torch
    tensor would cross as a shared-memory file descriptor, slow to reopen in the main process.
    """

    unit: CacheUnit
    pixels: np.ndarray | None = None
    error: str | None = None
    original_hw: tuple[int, int] = (0, 0)
    input_hw: tuple[int, int] = (0, 0)
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    boxes: np.ndarray | None = None
    promptset_ids: np.ndarray | None = None
    promptset_md5: str = ""


class ImageLoader(Dataset):
    """Reads, preprocesses and pairs each unit's image with its prompt sets (runs in workers)."""

    def __init__(self, units: list[CacheUnit], project_root: Path, preprocessor, max_promptsets: int):
        self.units = units
        self.project_root = Path(project_root)
        self.preprocessor = preprocessor
        self.max_promptsets = max_promptsets

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> LoadedImage:
        unit = self.units[index]
        item = LoadedImage(unit)
        path = promptset_path(self.project_root, unit.split, unit.safe_id)
        try:
            # md5 before reading: if the file changes in between, the stored md5 is the old one
            # and the next run recomputes the entry.
            item.promptset_md5 = promptset_md5(self.project_root, unit) or ""
            record = load_promptsets(self.project_root, unit.split, unit.safe_id)
        except (OSError, ValueError) as exc:
            item.error = (f"{path}: missing or unreadable prompt-set file ({type(exc).__name__}); "
                          "rerun generate_promptsets.py")
            return item
        try:
            prompts, promptset_ids = record_prompts(record)
            points, labels, boxes = prompts.point_coords, prompts.point_labels, prompts.boxes
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            item.error = f"{path}: malformed prompt-set file ({error_line(exc)}); rerun generate_promptsets.py"
            return item
        if not 0 < points.shape[0] <= self.max_promptsets:
            item.error = (f"{path}: {points.shape[0]} prompt sets, the cache holds 1 to "
                          f"{self.max_promptsets} (prompt_generation.num_promptsets_*)")
            return item
        try:
            image = read_image_rgb(unit.image_path)
        except ImageReadError as exc:
            item.error = str(exc)
            return item
        item.original_hw = (int(image.shape[0]), int(image.shape[1]))
        item.input_hw = tuple(int(v) for v in self.preprocessor.input_size(item.original_hw))
        item.pixels = self.preprocessor.prepare(image).numpy()
        item.points, item.labels, item.boxes = points.numpy(), labels.numpy(), boxes.numpy()
        item.promptset_ids = promptset_ids
        return item


def collate_loaded(items: list[LoadedImage]) -> dict:
    """``{"items": [...], "pixels": [B' uint8 arrays]}`` (B' = the items that loaded; their sizes
    may differ)."""
    return {"items": items, "pixels": [item.pixels for item in items if item.pixels is not None]}


# --------------------------------------------------------------------------- encode + decode


def compute_entries(backbone, batch: dict, prompt_mode: str, multimask_policy: str,
                    host_array: HostArray | None = None) -> list[sam_cache.CacheEntry]:
    """Finish preprocessing on the backbone's device, encode the batch, decode every image's prompt
    sets in one call per image, and copy the batch's outputs to the host at once (into
    ``host_array``'s arrays when given: the cache writer's)."""
    items = [item for item in batch["items"] if item.pixels is not None]
    if not items:
        return []
    pixels = backbone.preprocessor.finish([torch.from_numpy(p) for p in batch["pixels"]], backbone.device)
    features = round_features(backbone.encode(pixels))
    requests = [EntryRequest(item.original_hw, item.input_hw,
                             Prompts(*(torch.from_numpy(a) for a in (item.points, item.labels, item.boxes))),
                             item.promptset_ids, item.unit.safe_id, item.unit.split, item.promptset_md5)
                for item in items]
    return decoded_entries(backbone, features, requests, prompt_mode, multimask_policy, host_array)


def feature_shapes(backbone) -> dict[str, tuple[int, int, int]]:
    """name -> ``(C, h, w)`` of the encoder features (from the backbone, else one probe encode)."""
    known = getattr(backbone, "feature_shapes", None)
    if known:
        return {name: tuple(int(v) for v in shape) for name, shape in dict(known).items()}
    probe = torch.zeros(1, 3, backbone.image_size, backbone.image_size)
    return {name: tuple(int(v) for v in value.shape[1:]) for name, value in backbone.encode(probe).items()}


# --------------------------------------------------------------------------- the stage


def make_layout(cfg: PipelineConfig, backbone, shard: Shard, units: list[CacheUnit],
                shapes: dict[str, tuple[int, int, int]]) -> sam_cache.ShardLayout:
    pg = cfg.prompt_generation
    max_promptsets = max(pg.num_promptsets_train, pg.num_promptsets_val, pg.num_promptsets_test)
    return sam_cache.ShardLayout(
        backbone_id=sam_cache.backbone_id(backbone.family, backbone.model_type, backbone.checkpoint_md5),
        family=backbone.family,
        model_type=backbone.model_type,
        checkpoint_md5=backbone.checkpoint_md5,
        shard_index=shard.index,
        shard_count=shard.count,
        slots=tuple((u.split, u.safe_id) for u in units),
        feature_shapes=tuple((name, tuple(shapes[name])) for name in backbone.feature_names),
        max_promptsets=max_promptsets,
        num_outputs=MULTIMASK_POLICIES[cfg.sam.multimask_policy].num_outputs,
    )


@dataclass
class PrecomputeResult:
    counts: UnitCounts
    images_per_s: float
    shard_path: Path


def run_precompute(cfg: PipelineConfig, backbone, shard: Shard, force: bool = False, tracker=None,
                   log_every: int = 100) -> PrecomputeResult:
    """Fill this shard's cache file (``force``: start it over from an empty file).

    A unit is skipped when its entry is complete and was made from the current prompt-set file;
    an unreadable image or missing prompt-set file is a failed unit (one-line reason), never a
    crash. ``tracker`` (optional) gets done/skipped/failed and images/s every ``log_every``.
    """
    project_root = cfg.project_root
    sam = cfg.sam
    units = shard.select(list_units(cfg))
    md5s = {u.safe_id: promptset_md5(project_root, u) for u in units}
    folder = cache_dir(project_root, sam_cache.backbone_id(
        backbone.family, backbone.model_type, backbone.checkpoint_md5))
    path = folder / sam_cache.shard_file_name(shard.index, shard.count)
    shapes = _stored_feature_shapes(path) or feature_shapes(backbone)
    layout = make_layout(cfg, backbone, shard, units, shapes)
    writer = shard_writer.ShardWriter.open(folder, layout, {k: v for k, v in md5s.items() if v}, rebuild=force)
    for message in writer.messages:
        log.info("[precompute] %s", message)
    shard_writer.write_backbone_info(folder, {
        "backbone_id": layout.backbone_id, "family": backbone.family, "model_type": backbone.model_type,
        "checkpoint_path": str(backbone.checkpoint_path), "checkpoint_md5": backbone.checkpoint_md5,
        "image_size": backbone.image_size, "feature_shapes": {k: list(v) for k, v in layout.feature_shapes},
        "prompt_mode": sam.prompt_mode, "multimask_policy": sam.multimask_policy,
    })

    counts = UnitCounts()
    pending = []
    for unit in units:
        if md5s[unit.safe_id] is not None and writer.is_complete(unit.safe_id, md5s[unit.safe_id]):
            counts.skipped += 1
        else:
            pending.append(unit)
    writer.invalidate([u.safe_id for u in pending])
    log.info("[precompute] %s: %d images, %d already cached, %d to compute -> %s", shard.name, len(units),
             counts.skipped, len(pending), writer.path)

    started = time.perf_counter()
    progress = {"written": 0, "logged": 0}

    def report(force_log: bool = False) -> None:
        processed = counts.done + counts.failed
        if tracker is not None and (force_log or processed - progress["logged"] >= log_every):
            progress["logged"] = processed
            elapsed = max(time.perf_counter() - started, 1e-9)
            tracker.log({**counts.as_dict(), "images_per_s": counts.done / elapsed})

    def on_written(n: int) -> None:
        progress["written"] += n

    background = None
    try:
        background = CACHE_WRITERS[sam.cache_writer](writer, on_written, batch_size=max(1, sam.encoder_batch_size))
        if pending:
            loader = DataLoader(
                ImageLoader(pending, project_root, backbone.preprocessor, layout.max_promptsets),
                batch_size=max(1, sam.encoder_batch_size),
                num_workers=max(0, sam.num_workers),
                collate_fn=collate_loaded,
                worker_init_fn=DieWithParent(),
                persistent_workers=False,
                prefetch_factor=2 if sam.num_workers > 0 else None,
            )
            images = Progress(len(pending), f"precompute {shard.name}", "images")
            for batch in loader:
                images.update(len(batch["items"]))
                for item in batch["items"]:
                    if item.error is not None:
                        counts.failed += 1
                        counts.failures.append((item.unit.sample_id, item.error))
                        log.warning("%s: %s", item.unit.sample_id, item.error)
                entries = compute_entries(backbone, batch, sam.prompt_mode, sam.multimask_policy,
                                          background.host_arrays())
                background.put(entries)
                counts.done += len(entries)
                report()
            images.close()
        background.close()
    finally:
        writer = background.release() if background is not None else writer
        writer.write_manifest()
        writer.close()
    report(force_log=True)
    elapsed = time.perf_counter() - started
    return PrecomputeResult(counts, counts.done / elapsed if elapsed > 0 else 0.0, writer.path)


def _stored_feature_shapes(path: Path) -> dict[str, tuple[int, int, int]] | None:
    """Feature shapes recorded in an existing shard file (saves a probe encode), else None."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return {k: tuple(v) for k, v in json.loads(handle.attrs["feature_shapes"]).items()}
    except (OSError, KeyError, ValueError):
        return None


def run_stage(ctx, shard: Shard) -> None:
    """Stage 3 entry point (``precompute_sam_outputs.py``). Shards of one cache run at once, so each
    process holds the lock of its own shard file, not of the whole cache folder."""
    sam = ctx.cfg.sam
    check_registered(sam.family, sam.model_type)
    checkpoint_md5 = configured_checkpoint_md5(sam.checkpoint)
    backbone_folder = sam_cache.backbone_id(sam.family, sam.model_type, checkpoint_md5)
    ctx.hold_lock(ctx.output_dir / backbone_folder / sam_cache.shard_file_name(shard.index, shard.count))
    # The config keys the cached arrays depend on; the checkpoint's md5 also names the cache folder, and
    # sam.encoder_int8, which moves the features, counts when on. Device, batch sizes, workers and the
    # encoder impl (equal to float tolerance) only change speed.
    upstream = {"checkpoint_md5": checkpoint_md5, **sam_cache.encoder_weight_inputs(sam.encoder_int8)}
    ctx.check_inputs(sam_cache.SAM_OUTPUT_KEYS, upstream=upstream,
                     fingerprint_file=f"{backbone_folder}/{FINGERPRINT_FILE}")
    backbone = load_configured_backbone(sam)
    log.info("[%s] %r, %s", ctx.name, backbone, shard.name)
    result = run_precompute(ctx.cfg, backbone, shard, force=ctx.force, tracker=ctx.tracker)
    counts = result.counts
    for sample_id, reason in counts.failures[:20]:
        log.info("  failed: %s: %s", sample_id, reason)
    ctx.summary({**counts.as_dict(), "images_per_s": round(result.images_per_s, 3),
                 "shard_file": str(result.shard_path)})
    counts.raise_if_failed(ctx.name, "images")
