"""Stage 1 (``build_manifests.py``): write the demo data if asked, then the manifest CSVs."""

from __future__ import annotations

import logging

from modules.core.config import require_existing
from modules.core.errors import PipelineError
from modules.core.fileio import atomic_write_text
from modules.core.paths import manifest_path, validation_memo_path
from modules.data.demo_dataset import write_demo_dataset
from modules.data.manifest import SPLITS, build_manifest_tables, read_manifest_csv
from modules.data.manifest_checksums import record_manifest_checksums
from modules.data.sample_files import LOCATION_KEYS, DataRoots
from modules.data.validation_memo import ValidationMemo

log = logging.getLogger("pipeline")


def run_stage(ctx) -> None:
    """Stage 1: (demo data,) scan, validate, name and split; write the manifest CSVs.

    A rerun rescans the folders: samples already in ``all_samples.csv`` keep their split and
    safe id, new ones are assigned, and CSVs whose content did not change are not rewritten. The
    valid samples' paths are stored relative to their data roots (``sample_files``), and the roots
    are no input: a project or data folder that moved is rescanned and, unchanged, rewrites nothing.
    Only pairs that are new, changed (size or modification time) or invalid are decoded again
    (``validation_memo``; ``--force`` decodes all).
    """
    cfg = ctx.cfg
    data = cfg.data
    if cfg.demo.enabled:
        log.info("[%s] demo data: %d scenes per group -> %s", ctx.name, cfg.demo.scenes_per_group, data.images_root)
        write_demo_dataset(data.images_root, data.masks_root, cfg.demo.scenes_per_group, cfg.demo.seed)
    require_existing(cfg, "data.images_root")
    if data.layout == "split_roots":
        require_existing(cfg, "data.masks_root")
    content_keys = [f"data.{key}" for key in cfg.section("data") if key not in LOCATION_KEYS]
    fresh = ctx.check_inputs([*content_keys, "demo"])

    previous = manifest_path(ctx.project_root, "all_samples")
    existing_splits = existing_safe_ids = None
    if previous.is_file() and not fresh:
        earlier = read_manifest_csv(previous)
        existing_splits = dict(zip(earlier["sample_id"], earlier["split"]))
        existing_safe_ids = dict(zip(earlier["sample_id"], earlier["safe_id"]))
    roots = DataRoots.from_config(data)
    memo = ValidationMemo(validation_memo_path(ctx.project_root), roots, data.mask_threshold, data.min_image_side,
                          reuse=not ctx.force)
    try:
        valid, invalid = build_manifest_tables(
            data.layout, data.images_root, data.masks_root, data.mask_threshold, data.min_image_side,
            data.split_seed, data.split_fractions, existing_splits, existing_safe_ids=existing_safe_ids,
            validate=memo.validate,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise PipelineError(str(exc)) from None
    if valid.empty:
        raise PipelineError(f"data.images_root: no valid image/mask pair found under {data.images_root} "
                            f"({len(invalid)} invalid; see the layout options in README.md)")

    valid = roots.store(valid)
    tables = {"all_samples": valid, "invalid_samples": invalid}
    tables.update({split: valid[valid["split"] == split] for split in SPLITS})
    rewritten = []
    for name, frame in tables.items():
        path = manifest_path(ctx.project_root, name)
        text = frame.to_csv(index=False)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
            rewritten.append(name)
    record_manifest_checksums(manifest_path(ctx.project_root, name) for name in tables)
    memo.save()

    per_group = (valid.groupby(["group", "split"]).size().unstack(fill_value=0)
                 .reindex(columns=list(SPLITS), fill_value=0).reset_index())
    invalid_counts = invalid["reason"].value_counts().to_dict()
    ctx.tracker.log({"valid": len(valid), "invalid": len(invalid),
                     **{f"split/{s}": int((valid["split"] == s).sum()) for s in SPLITS}})
    ctx.tracker.log_table("per_group", per_group)
    ctx.tracker.log_table("invalid_samples", invalid)
    log.info("[%s] samples per group and split:\n%s", ctx.name, per_group.to_string(index=False))
    ctx.summary({"valid": len(valid), "invalid": len(invalid), "invalid_reasons": invalid_counts,
                 "validated": len(valid) + len(invalid) - memo.reused, "reused_validations": memo.reused,
                 **{f"{s}_samples": int((valid["split"] == s).sum()) for s in SPLITS},
                 "rewritten": rewritten or "nothing (unchanged)"})
