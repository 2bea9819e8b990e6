"""Stage 1's validation results kept between runs, so that a rerun decodes only new or changed pairs.

``validate_candidate`` decodes every image and mask in full (that is how truncated files are caught),
which is most of a stage 1 run on a large data set, and a rerun used to do all of it again to find
the same answers. A valid pair's record is reused when both files still have the size and
modification time (ns) they had when it was made, under the same ``data.mask_threshold`` and
``data.min_image_side``. An invalid pair is validated again: such pairs are few, and their messages
name files. The memo is keyed by the paths relative to the data roots (``sample_files``), so a
data folder copied with its modification times (``rsync -a``, ``cp -p``) keeps it; ``--force``
ignores it.

A file rewritten in place that keeps its size and modification time is not noticed here (nor by
make); stage 2 hashes the mask and the image and redoes what depends on them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from modules.core.fileio import atomic_write_json, read_json
from modules.data.manifest import Candidate, InvalidRecord, SampleRecord, validate_candidate
from modules.data.sample_files import DataRoots

#: Bumped when ``validate_candidate`` changes what it records or accepts: older memos are then unused.
MEMO_VERSION = 1
#: What a record holds beyond its sample id and paths (which come from the candidate of this run).
MEASURED_FIELDS = ("image_h", "image_w", "mask_h", "mask_w", "size_mismatch", "foreground_fraction",
                   "image_mode", "mask_format")


class ValidationMemo:
    """``validate`` stands in for ``validate_candidate`` in ``build_manifest_tables``; ``save``
    then writes the records of this run's valid pairs (atomically, unless the memo read at the
    start already holds exactly them)."""

    def __init__(self, path: Path, roots: DataRoots, mask_threshold: int, min_image_side: int, reuse: bool):
        self.path = Path(path)
        self.roots = roots
        self.mask_threshold, self.min_image_side = mask_threshold, min_image_side
        self.settings = {"version": MEMO_VERSION, "mask_threshold": mask_threshold, "min_image_side": min_image_side}
        self.earlier = self._read() if reuse else {}
        self.records: dict[str, dict] = {}
        self.reused = 0

    def _read(self) -> dict[str, dict]:
        try:
            stored = read_json(self.path)
        except (OSError, ValueError):  # none yet, or damaged: validate everything
            return {}
        if not isinstance(stored, dict) or stored.get("settings") != self.settings:
            return {}
        records = stored.get("records")
        return records if isinstance(records, dict) else {}

    def _key(self, candidate: Candidate) -> str | None:
        """The stored paths, sizes and modification times of both files; None without both."""
        if candidate.image_path is None or candidate.mask_path is None:
            return None
        try:
            image, mask = os.stat(candidate.image_path), os.stat(candidate.mask_path)
        except OSError:
            return None
        return json.dumps([self.roots.stored_image(candidate.image_path), image.st_size, image.st_mtime_ns,
                           self.roots.stored_mask(candidate.mask_path), mask.st_size, mask.st_mtime_ns])

    def validate(self, candidate: Candidate) -> SampleRecord | InvalidRecord:
        key = self._key(candidate)  # before decoding: a file changed meanwhile is validated next run
        known = self.earlier.get(key) if key is not None else None
        if isinstance(known, dict) and set(known) == set(MEASURED_FIELDS):
            self.reused += 1
            self.records[key] = known
            return SampleRecord(sample_id=candidate.sample_id, group=candidate.group, stem=candidate.stem,
                                image_path=str(candidate.image_path), mask_path=str(candidate.mask_path), **known)
        result = validate_candidate(candidate, self.mask_threshold, self.min_image_side)
        if key is not None and isinstance(result, SampleRecord):
            measured = asdict(result)
            self.records[key] = {name: measured[name] for name in MEASURED_FIELDS}
        return result

    def save(self) -> None:
        if self.records and self.records == self.earlier:  # read from the file, under these settings
            return
        atomic_write_json(self.path, {"settings": self.settings, "records": self.records})
