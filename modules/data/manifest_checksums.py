"""The md5 of each manifest CSV stage 1 wrote, recorded beside them, so that a damaged or edited
manifest is noticed by every stage that reads it instead of being used.

Stage 1 writes ``manifests/checksums.json`` (``{file name: md5}``) after its CSVs;
``verify_manifest`` compares a manifest with it before the manifest is parsed. A manifest the file
does not list (a project made before the checksums existed, a table written by hand for a test) is
read unchecked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from modules.core.errors import PipelineError
from modules.core.fileio import atomic_write_json, file_md5, read_json
from modules.core.paths import MANIFEST_CHECKSUMS_FILE


def checksums_file(manifest: Path) -> Path:
    """The checksum file that lists ``manifest`` (beside it)."""
    return Path(manifest).parent / MANIFEST_CHECKSUMS_FILE


def record_manifest_checksums(manifests: Iterable[Path]) -> None:
    """Record the md5 of each of these manifest files (one folder) in its ``checksums.json``;
    rewritten only when it changes."""
    manifests = list(manifests)
    if not manifests:
        return
    path = checksums_file(manifests[0])
    recorded = {Path(m).name: file_md5(m) for m in manifests}
    try:
        if read_json(path) == recorded:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, recorded)


def verify_manifest(manifest: Path) -> None:
    """A one-line ``PipelineError`` naming ``manifest`` when its md5 is not the one stage 1
    recorded for it (damaged or edited); nothing when it matches or is not listed."""
    path = checksums_file(manifest)
    if not path.is_file():
        return
    try:
        recorded = read_json(path).get(Path(manifest).name)
    except (OSError, ValueError, AttributeError):
        raise PipelineError(f"{path}: unreadable (damaged); rerun build_manifests.py --force to rewrite it") from None
    if recorded is not None and file_md5(manifest) != recorded:
        raise PipelineError(f"{manifest}: differs from what build_manifests.py wrote (its md5 in {path.name}): "
                            "damaged or edited; rerun build_manifests.py to rewrite it "
                            "(with --force if this is all_samples.csv)")
