"""Stage 2 (``generate_promptsets.py``): one JSON of seeded prompt sets per sample and split."""

from __future__ import annotations

import json

from modules.core.fileio import atomic_write_text, cached_file_md5
from modules.core.paths import promptset_path
from modules.core.stage import UnitCounts, UnitError
from modules.data.imageio import MaskReadError, read_mask, resize_mask_nearest
from modules.data.manifest import SPLITS, load_split_manifest
from modules.data.promptset import PromptSpec, build_promptset_record, dumps_record
from modules.data.sample_files import DataRoots


def run_stage(ctx) -> None:
    """Stage 2: one JSON of seeded prompt sets per sample and split, skipping finished samples.

    Each JSON records its ``source``: the md5s of the mask its prompts were drawn from and of the
    image. Stage 3 and every later stage know a sample's record by this file's md5, so an image or
    mask edited in place rewrites the JSON and everything built on it is recomputed or stopped; where
    the data lies does not count (a moved data folder keeps its prompt sets). A sample counts as
    finished when its JSON exists and both md5s match (one written before the image's md5 was
    recorded: the mask's); the config it was drawn with is guarded by the stage fingerprint. A
    sample whose mask can no longer be read (it changed after stage 1) fails: the others are
    written, then the stage exits with one line naming it.
    """
    cfg = ctx.cfg
    pg = cfg.prompt_generation
    spec = PromptSpec(pg.min_pairs, pg.max_pairs, pg.prompt_seed, pg.gaussian_sigma, pg.box_jitter)
    ctx.check_inputs(["prompt_generation", "data.mask_threshold"])
    roots = DataRoots.from_config(cfg.data)

    def source_of(sample) -> dict:
        return {"mask_path": sample["mask_path"], "mask_md5": cached_file_md5(roots.mask(sample["mask_path"])),
                "image_md5": cached_file_md5(roots.image(sample["image_path"]))}

    totals = {}
    all_counts = UnitCounts()
    for split in SPLITS:
        samples = load_split_manifest(ctx.project_root, split).to_dict("records")
        num_sets = getattr(pg, f"num_promptsets_{split}")

        def is_complete(sample, split=split) -> bool:
            path = promptset_path(ctx.project_root, split, sample["safe_id"])
            if not path.is_file():
                return False
            try:
                recorded, current = json.loads(path.read_text(encoding="utf-8")).get("source"), source_of(sample)
                return (recorded["mask_md5"] == current["mask_md5"]
                        and recorded.get("image_md5", current["image_md5"]) == current["image_md5"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False

        def process(sample, split=split, num_sets=num_sets) -> None:
            mask_file = roots.mask(sample["mask_path"])
            try:
                source = source_of(sample)
                mask = read_mask(mask_file, threshold=cfg.data.mask_threshold)
            except (MaskReadError, OSError) as exc:
                raise UnitError(str(exc)) from None
            size = (int(sample["image_h"]), int(sample["image_w"]))
            if mask.shape != size:
                mask = resize_mask_nearest(mask, size)
            if not mask.any() or mask.all():
                raise UnitError(f"{mask_file}: mask is empty or full at image size")
            record = build_promptset_record(sample, split, mask, num_sets, spec, source)
            atomic_write_text(promptset_path(ctx.project_root, split, sample["safe_id"]), dumps_record(record))

        counts = ctx.run_units(samples, is_complete, process, desc=f"prompt sets [{split}]",
                               unit_name=lambda s: s["sample_id"], metric_prefix=f"{split}/")
        totals.update({f"{split}_{k}": v for k, v in counts.as_dict().items()})
        all_counts.add(counts)
    ctx.summary(totals)
    all_counts.raise_if_failed(ctx.name, "samples")
