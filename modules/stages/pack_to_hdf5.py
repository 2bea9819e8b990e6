"""Stage 4.5 (``pack_to_hdf5.py``): one packed HDF5 file of head inputs and targets per split."""

from __future__ import annotations

import logging
import time
from typing import Any

from modules.cache.packing import PackPlan, PackSettings, SplitPacker, partial_path, split_is_packed
from modules.cache.training_index import PackingError, load_index, open_cache
from modules.core.config import unseen_group_keys
from modules.core.fileio import remove_file
from modules.core.paths import index_path, packed_path, training_data_dir
from modules.core.stage import upstream_fingerprint
from modules.data.manifest import SPLITS
from modules.data.sample_files import DataRoots

log = logging.getLogger("pipeline")


def run_stage(ctx) -> None:
    """Stage 4.5 entry point (``pack_to_hdf5.py``): one packed HDF5 file per split.

    Fingerprint: ``training.logit_clip``, ``data.mask_threshold``, ``head.use_image_embedding``,
    ``data.unseen_groups`` (when set) and the index CSVs. Units are samples (via ``ctx.run_units``, so the SIGKILL test hook
    applies). A split whose final file matches is skipped; an interrupted one resumes.
    """
    cfg = ctx.cfg
    settings = PackSettings.from_config(cfg)
    index_files = [index_path(ctx.project_root, split) for split in SPLITS]
    for split in SPLITS:
        load_index(ctx.project_root, split)  # each exists and is an index, before anything is touched
    # Each packed file also records its own fingerprint, so only --force discards finished rows.
    ctx.check_inputs(["training.logit_clip", "data.mask_threshold", "head.use_image_embedding",
                      *unseen_group_keys(cfg)],
                     upstream={"indices": upstream_fingerprint(index_files)},
                     fingerprint_file=f".stage.{ctx.name}.json")
    cache = open_cache(cfg)
    totals: dict[str, Any] = {}
    incomplete: list[str] = []
    for split, path in zip(SPLITS, index_files):
        plan = PackPlan.from_index(split, path.read_bytes(), settings)
        other_backbones = set(plan.index["cache_backbone_id"]) - {cache.folder.name}
        if other_backbones:
            raise PackingError(f"{path}: indexed from the SAM cache of {sorted(other_backbones)[0]}, but the config "
                               f"names {cache.folder.name}; rerun build_training_indices.py --force")
        if not ctx.force and split_is_packed(ctx.project_root, split, plan.fingerprint):
            log.info(f"[{ctx.name}] {split}: {packed_path(ctx.project_root, split)} is complete, skipped")
            remove_file(partial_path(ctx.project_root, split), ctx.project_root)  # left by an interrupted --force run
            totals[f"{split}_rows"] = len(plan.index)
            totals[f"{split}_status"] = "skipped"
            continue
        if not ctx.force and packed_path(ctx.project_root, split).is_file():
            log.info(f"[{ctx.name}] {split}: {packed_path(ctx.project_root, split)} was packed from other inputs "
                  "or in an older format; repacking it")
        started = time.perf_counter()
        packer = SplitPacker(ctx.project_root, plan, settings, cache, DataRoots.from_config(cfg.data), fresh=ctx.force)
        for message in packer.messages:
            log.info(f"[{ctx.name}] {message}")
        try:
            counts = ctx.run_units(packer.sample_numbers, packer.is_complete, packer.pack_sample,
                                   desc=f"packing [{split}]", unit_name=packer.sample_name,
                                   metric_prefix=f"{split}/")
            rows_complete = packer.rows_complete
            published = packer.publish()
        finally:
            packer.close()
        seconds = time.perf_counter() - started
        status = "packed" if published else "incomplete"
        if not published:
            incomplete.append(f"{split} ({counts.failed} samples failed)")
            for name, reason in counts.failures[:10]:
                log.info(f"  failed: {name}: {reason}")
        size_mb = (packed_path if published else partial_path)(ctx.project_root, split).stat().st_size / 2**20
        stats = {"rows": len(plan.index), "rows_complete": rows_complete, "samples": len(plan.safe_ids),
                 "file_mb": round(size_mb, 1), "seconds": round(seconds, 2), **counts.as_dict()}
        ctx.tracker.log({f"{split}/{key}": value for key, value in stats.items()})
        totals.update({f"{split}_{key}": value for key, value in stats.items()})
        totals[f"{split}_status"] = status
    ctx.summary(totals)
    if incomplete:
        raise PackingError(f"{training_data_dir(ctx.project_root)}: not packed completely: {', '.join(incomplete)}; "
                           "fix the failures above and rerun pack_to_hdf5.py (finished rows are kept)")
