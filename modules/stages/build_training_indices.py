"""Stage 4 (``build_training_indices.py``): one training index CSV per split."""

from __future__ import annotations

import logging
from typing import Any

from modules.cache.training_index import build_split_index, cache_locations, cache_manifest_paths, open_cache
from modules.core.config import unseen_group_keys
from modules.core.fileio import atomic_write_text
from modules.core.paths import index_path
from modules.core.stage import upstream_fingerprint
from modules.data.domains import FITTED_SPLITS, checked_unseen_groups
from modules.data.manifest import SPLITS, split_manifest_paths

log = logging.getLogger("pipeline.packing")


def run_stage(ctx) -> None:
    """Stage 4 entry point (``build_training_indices.py``): one index CSV per split.

    Fingerprint: the backbone config, ``data.unseen_groups`` (when set), the split manifests and the
    cache manifests (which carry every entry's prompt-set md5). A CSV is rewritten only when its
    content changes. The unseen groups are left out of the train and val indices (never fitted on);
    the test index keeps them.
    """
    unseen = checked_unseen_groups(ctx.cfg)
    cache = open_cache(ctx.cfg)
    locations = cache_locations(cache)
    backbone = cache.folder.name
    ctx.check_inputs(
        ["sam.family", "sam.model_type", *unseen_group_keys(ctx.cfg)],
        upstream={"backbone_id": backbone,
                  "manifests": upstream_fingerprint(split_manifest_paths(ctx.project_root)),
                  "cache_manifests": upstream_fingerprint(cache_manifest_paths(cache))},
        fingerprint_file=f".stage.{ctx.name}.json",
    )
    log.info(f"[{ctx.name}] cache {cache.folder} ({len(locations)} complete images)")
    totals: dict[str, Any] = {}
    for split in SPLITS:
        index = build_split_index(ctx.project_root, split, locations,
                                  unseen if split in FITTED_SPLITS else frozenset())
        path = index_path(ctx.project_root, split)
        text = index.frame.to_csv(index=False)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
            log.info(f"[{ctx.name}] wrote {path}")
        left_out = index.missing_from_cache + index.stale_in_cache
        if index.missing_from_cache:
            log.warning("%s: %d samples left out, not in the SAM cache (failed in stage 2 or 3), e.g. %s",
                        split, len(index.missing_from_cache), ", ".join(index.missing_from_cache[:5]))
        if index.stale_in_cache:
            log.warning("%s: %d samples left out, their prompt sets changed since the cache was computed "
                        "(rerun precompute_sam_outputs.py), e.g. %s",
                        split, len(index.stale_in_cache), ", ".join(index.stale_in_cache[:5]))
        if index.held_out:
            print(f"[{ctx.name}] {split}: {len(index.held_out)} samples of the unseen groups "
                  f"({', '.join(sorted(unseen))}) held out")
        stats = index.stats()
        ctx.tracker.log({f"{split}/{key}": value for key, value in stats.items() if value is not None})
        totals.update({f"{split}_{key}": value for key, value in stats.items()})
        if left_out:
            totals[f"{split}_left_out_examples"] = left_out[:5]
    ctx.summary(totals)
