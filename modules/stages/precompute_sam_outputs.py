"""Stage 3: run the frozen SAM once per image and cache what later stages need.

Per image: the encoder features (float16) and, for every prompt set of the image, the FRAME256
low-resolution logits of the output chosen by ``sam.multimask_policy`` with all predicted IoUs
(layout and crash safety: ``modules/sam_cache.py``). Gaussian prompt maps are not stored; they
are derived from the prompt sets (``promptset.gaussian_prompt_maps``).

Pipeline of one shard: DataLoader workers read and preprocess images and load prompt sets ->
the encoder runs on batches of ``sam.encoder_batch_size`` images -> per image ONE decoder call
for all its prompt sets -> a background thread writes each batch to the shard file (data,
flush, flags, flush) while the next batch is encoded.

Features are rounded to float16 BEFORE decoding, so the stored logits are exactly what the
decoder gives from the stored features: a later stage re-running the decoder on the cache
reproduces them.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from modules.cache import sam_cache, shard_writer
from modules.core.config import PipelineConfig
from modules.core.stage import Shard, UnitCounts
from modules.core.frames import FRAME256
from modules.core.paths import cache_dir

log = logging.getLogger("pipeline.precompute")

#: Test hook: SIGKILL this process after the data rows of the batch holding the n-th written
#: image are flushed and before their completion flags are (the worst moment for the cache).
KILL_AFTER_IMAGES_ENV = "PIPELINE_TEST_KILL_AFTER_IMAGES"

#: The config keys the cached arrays depend on (the stage fingerprint). Checkpoint identity is
#: in the cache folder name (md5); device, batch size and worker count only change speed.
FINGERPRINT_KEYS = ("sam.family", "sam.model_type", "sam.prompt_mode", "sam.multimask_policy")


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class PromptInputs:
    """``backbone.decode`` prompt arguments in the ORIGINAL frame (None = not given)."""

    point_coords: torch.Tensor | None
    point_labels: torch.Tensor | None
    boxes: torch.Tensor | None


#: sam.prompt_mode -> which prompts of a prompt set go into the decoder.
PROMPT_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], PromptInputs]] = {
    "points": lambda points, labels, boxes: PromptInputs(points, labels, None),
    "box": lambda points, labels, boxes: PromptInputs(None, None, boxes),
    "points_and_box": lambda points, labels, boxes: PromptInputs(points, labels, boxes),
}


@dataclass(frozen=True)
class MultimaskPolicy:
    """How one logit map per prompt set is chosen from the decoder's outputs."""

    multimask_output: bool
    num_outputs: int

    def select(self, logits: torch.Tensor, iou_predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``P x M x 256 x 256`` logits, ``P x M`` IoUs -> ``P x 256 x 256`` logits, ``P`` indices."""
        branch = iou_predictions.argmax(dim=1)
        chosen = logits[torch.arange(logits.shape[0], device=logits.device), branch]
        return chosen, branch


#: sam.multimask_policy -> policy. ``single``: the single-mask output (M = 1, index 0);
#: ``best_iou``: the multimask output (M = 3) with the highest predicted IoU.
MULTIMASK_POLICIES: dict[str, MultimaskPolicy] = {
    "single": MultimaskPolicy(multimask_output=False, num_outputs=1),
    "best_iou": MultimaskPolicy(multimask_output=True, num_outputs=3),
}


# --------------------------------------------------------------------------- units


@dataclass(frozen=True)
class CacheUnit:
    """One image of one split (a row of the split manifest)."""

    split: str
    safe_id: str
    sample_id: str
    image_path: str


def list_units(project_root: Path) -> list[CacheUnit]:
    """Every sample of every split, in a fixed order (split order, then manifest order)."""
    from modules.data.manifest import SPLITS, load_split_manifest

    units = []
    for split in SPLITS:
        for row in load_split_manifest(project_root, split).to_dict("records"):
            units.append(CacheUnit(split, str(row["safe_id"]), str(row["sample_id"]), str(row["image_path"])))
    return units


def promptset_md5(project_root: Path, unit: CacheUnit) -> str | None:
    """md5 of the unit's prompt-set JSON, None when the file is missing."""
    from modules.core.fileio import cached_file_md5
    from modules.data.promptset import promptset_path

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
    tensor would cross as a shared-memory file descriptor, whose reopening in the main process
    cost ~4 ms per tensor (on an H200 host that was over half of stage 3's main-thread time).
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
        from modules.data.imageio import ImageReadError, read_image_rgb
        from modules.data.promptset import load_promptsets, promptset_path, promptset_tensors

        unit = self.units[index]
        item = LoadedImage(unit)
        path = promptset_path(self.project_root, unit.split, unit.safe_id)
        try:
            # md5 before reading: if the file changes in between, the stored md5 is the old one
            # and the next run recomputes the entry.
            item.promptset_md5 = promptset_md5(self.project_root, unit) or ""
            record = load_promptsets(self.project_root, unit.split, unit.safe_id)
        except (OSError, ValueError) as exc:
            item.error = f"{path}: missing or unreadable prompt-set file ({type(exc).__name__})"
            return item
        try:
            points, labels, _, boxes = promptset_tensors(record)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            item.error = f"{path}: malformed prompt-set file ({exc})"
            return item
        if points.shape[0] > self.max_promptsets:
            item.error = (f"{path}: {points.shape[0]} prompt sets, more than the cache's "
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
        item.promptset_ids = np.array([s["promptset_id"] for s in record["promptsets"]], dtype=np.int32)
        return item


def collate_loaded(items: list[LoadedImage]) -> dict:
    """``{"items": [...], "pixels": [B' uint8 arrays]}`` (B' = the items that loaded; their sizes
    may differ)."""
    return {"items": items, "pixels": [item.pixels for item in items if item.pixels is not None]}


# --------------------------------------------------------------------------- encode + decode


def _round_features(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16-rounded copies (what the cache stores), kept as float32 for the decoder."""
    return {name: value.to(torch.float16) for name, value in features.items()}


def compute_entries(backbone, batch: dict, prompt_mode: str, policy: MultimaskPolicy) -> list[sam_cache.CacheEntry]:
    """Finish preprocessing on the backbone's device, encode the batch, and decode every image's
    prompt sets in one call per image."""
    items = [item for item in batch["items"] if item.pixels is not None]
    if not items:
        return []
    pixels = backbone.preprocessor.finish([torch.from_numpy(p) for p in batch["pixels"]], backbone.device)
    features = _round_features(backbone.encode(pixels))
    entries = []
    for index, item in enumerate(items):
        single = {name: value[index : index + 1] for name, value in features.items()}
        prompts = PROMPT_MODES[prompt_mode](*(torch.from_numpy(a) for a in (item.points, item.labels, item.boxes)))
        logits, iou_predictions = backbone.decode(
            single, item.original_hw, point_coords=prompts.point_coords, point_labels=prompts.point_labels,
            boxes=prompts.boxes, mask_input=None, multimask_output=policy.multimask_output,
        )
        chosen, branch = policy.select(logits, iou_predictions)
        entries.append(sam_cache.CacheEntry(
            safe_id=item.unit.safe_id,
            split=item.unit.split,
            features={name: value[0].cpu().numpy() for name, value in single.items()},
            logits=chosen.to(torch.float16).cpu().numpy(),
            promptset_ids=item.promptset_ids,
            branch_index=branch.to(torch.int8).cpu().numpy(),
            iou_predictions=iou_predictions.float().cpu().numpy(),
            original_hw=item.original_hw,
            input_hw=item.input_hw,
            promptset_md5=item.promptset_md5,
        ))
    return entries


def feature_shapes(backbone) -> dict[str, tuple[int, int, int]]:
    """name -> ``(C, h, w)`` of the encoder features (from the backbone, else one probe encode)."""
    known = getattr(backbone, "feature_shapes", None)
    if known:
        return {name: tuple(int(v) for v in shape) for name, shape in dict(known).items()}
    probe = torch.zeros(1, 3, backbone.image_size, backbone.image_size)
    return {name: tuple(int(v) for v in value.shape[1:]) for name, value in backbone.encode(probe).items()}


# --------------------------------------------------------------------------- writer thread


class BackgroundWriter:
    """Writes batches of entries on one thread so the encoder does not wait for the disk.

    At most ``depth`` batches wait in the queue; an exception on the thread is re-raised by the
    next ``put`` or by ``close``.
    """

    def __init__(self, writer: shard_writer.ShardWriter, on_written: Callable[[int], None],
                 before_flags: Callable[[int], None] | None = None, depth: int = 2):
        self.writer = writer
        self.on_written = on_written
        self.before_flags = before_flags
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sam-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            entries = self._queue.get()
            if entries is None:
                return
            if self._error is not None:
                continue
            try:
                hook = (lambda n=len(entries): self.before_flags(n)) if self.before_flags else None
                self.writer.write_batch(entries, before_flags=hook)
                self.on_written(len(entries))
            except BaseException as exc:  # re-raised on the main thread
                self._error = exc

    def put(self, entries: list[sam_cache.CacheEntry]) -> None:
        if self._error is not None:
            raise self._error
        if entries:
            self._queue.put(entries)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _kill_hook() -> Callable[[int], None] | None:
    """The ``PIPELINE_TEST_KILL_AFTER_IMAGES`` hook (None when the variable is unset)."""
    limit = os.environ.get(KILL_AFTER_IMAGES_ENV)
    if not limit:
        return None
    state = {"written": 0}

    def hook(batch_size: int) -> None:
        state["written"] += batch_size
        if state["written"] >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


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
    policy = MULTIMASK_POLICIES[sam.multimask_policy]
    units = shard.select(list_units(project_root))
    md5s = {u.safe_id: promptset_md5(project_root, u) for u in units}
    folder = cache_dir(project_root, sam_cache.backbone_id(
        backbone.family, backbone.model_type, backbone.checkpoint_md5))
    path = folder / sam_cache.shard_file_name(shard.index, shard.count)
    shapes = _stored_feature_shapes(path) or feature_shapes(backbone)
    layout = make_layout(cfg, backbone, shard, units, shapes)
    writer = shard_writer.ShardWriter.open(folder, layout, {k: v for k, v in md5s.items() if v}, rebuild=force)
    for message in writer.messages:
        print(f"[precompute] {message}")
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
    print(f"[precompute] {shard.name}: {len(units)} images, {counts.skipped} already cached, "
          f"{len(pending)} to compute -> {writer.path}")

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

    try:
        background = BackgroundWriter(writer, on_written, before_flags=_kill_hook())
        if pending:
            loader = DataLoader(
                ImageLoader(pending, project_root, backbone.preprocessor, layout.max_promptsets),
                batch_size=max(1, sam.encoder_batch_size),
                num_workers=max(0, sam.num_workers),
                collate_fn=collate_loaded,
                persistent_workers=False,
                prefetch_factor=2 if sam.num_workers > 0 else None,
            )
            for batch in loader:
                for item in batch["items"]:
                    if item.error is not None:
                        counts.failed += 1
                        counts.failures.append((item.unit.sample_id, item.error))
                        log.warning("%s: %s", item.unit.sample_id, item.error)
                entries = compute_entries(backbone, batch, sam.prompt_mode, policy)
                background.put(entries)
                counts.done += len(entries)
                report()
        background.close()
    finally:
        writer.write_manifest()
        writer.close()
    report(force_log=True)
    elapsed = time.perf_counter() - started
    return PrecomputeResult(counts, counts.done / elapsed if elapsed > 0 else 0.0, writer.path)


def _stored_feature_shapes(path: Path) -> dict[str, tuple[int, int, int]] | None:
    """Feature shapes recorded in an existing shard file (saves a probe encode), else None."""
    import json

    import h5py

    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return {k: tuple(v) for k, v in json.loads(handle.attrs["feature_shapes"]).items()}
    except (OSError, KeyError, ValueError):
        return None


def run_stage(ctx, shard: Shard) -> None:
    """Stage 3 entry point (``precompute_sam_outputs.py``)."""
    from modules.sam.backbones import BackboneError, load_backbone
    from modules.core.errors import PipelineError
    from modules.core.fileio import cached_file_md5

    sam = ctx.cfg.sam
    try:
        checkpoint_md5 = cached_file_md5(sam.checkpoint)
    except OSError:
        raise PipelineError(f"sam.checkpoint: file not found: {sam.checkpoint}") from None
    backbone_folder = sam_cache.backbone_id(sam.family, sam.model_type, checkpoint_md5)
    ctx.check_inputs(FINGERPRINT_KEYS, upstream={"checkpoint_md5": checkpoint_md5},
                             fingerprint_file=f"{backbone_folder}/.stage.json")
    try:
        backbone = load_backbone(sam.family, sam.model_type, sam.checkpoint, sam.device)
    except BackboneError as exc:
        raise PipelineError(f"sam.checkpoint: {exc}") from None
    print(f"[{ctx.name}] {backbone!r}, {shard.name}")
    result = run_precompute(ctx.cfg, backbone, shard, force=ctx.force, tracker=ctx.tracker)
    counts = result.counts
    for sample_id, reason in counts.failures[:20]:
        print(f"  failed: {sample_id}: {reason}")
    ctx.summary({**counts.as_dict(), "images_per_s": round(result.images_per_s, 3),
                 "shard_file": str(result.shard_path)})


# --------------------------------------------------------------------------- sanity panels


def write_sanity_panels(ctx, split: str, count: int) -> list[Path]:
    """Six-panel PNGs (image + prompts, ground truth, SAM mask = logits > 0, SAM logits,
    positive and negative prompt maps) for the first ``count`` cached samples of ``split``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from modules.core.errors import PipelineError
    from modules.core.fileio import atomic_path, cached_file_md5
    from modules.data.imageio import read_image_rgb, read_mask
    from modules.data.manifest import load_split_manifest
    from modules.data.promptset import gaussian_prompt_maps, load_promptsets, promptset_tensors

    cfg = ctx.cfg
    sam = cfg.sam
    try:
        checkpoint_md5 = cached_file_md5(sam.checkpoint)
    except OSError:
        raise PipelineError(f"sam.checkpoint: file not found: {sam.checkpoint}") from None
    cache = sam_cache.SamCache(cfg.project_root,
                               backbone=sam_cache.backbone_id(sam.family, sam.model_type, checkpoint_md5))
    rows = {r["safe_id"]: r for r in load_split_manifest(cfg.project_root, split).to_dict("records")}
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
        figure, axes = plt.subplots(1, 6, figsize=(18, 3.4))
        valid = labels[0] >= 0
        pts, lab = points_256[0][valid].numpy(), labels[0][valid].numpy()
        panels = [(image, "image + prompts", None), (truth, "ground truth", "gray"),
                  (logits > 0, "SAM mask (logits > 0)", "gray"), (logits, "SAM logits", "coolwarm"),
                  (maps[0].numpy(), "positive map", "viridis"), (maps[1].numpy(), "negative map", "viridis")]
        for axis, (array, title, cmap) in zip(axes, panels):
            shown = axis.imshow(array, cmap=cmap)
            if title == "SAM logits":
                limit = float(np.abs(logits).max()) or 1.0
                shown.set_clim(-limit, limit)
                figure.colorbar(shown, ax=axis, fraction=0.046)
            axis.set_title(title, fontsize=9)
            axis.axis("off")
        axes[0].scatter(pts[lab == 1, 0], pts[lab == 1, 1], c="lime", s=18, marker="o")
        axes[0].scatter(pts[lab == 0, 0], pts[lab == 0, 1], c="red", s=18, marker="x")
        figure.suptitle(f"{split} / {row['sample_id']}  prompt set {int(entry.promptset_ids[0])}, "
                        f"branch {int(entry.branch_index[0])}, IoU pred {[round(float(v), 3) for v in entry.iou_predictions[0]]}",
                        fontsize=9)
        path = ctx.output_dir / f"{split}__{safe_id}.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=80, bbox_inches="tight", format="png")
        plt.close(figure)
        ctx.tracker.log_image(f"debug_panels/{safe_id}", path)
        written.append(path)
    print(f"[visualize_sanity] {len(written)} panels -> {ctx.output_dir}")
    return written
