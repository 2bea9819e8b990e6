"""Scan a dataset folder, validate every image/mask pair, name samples and split them.

``build_manifest_tables`` runs it all: ``scan_pairs`` pairs files by ``(group, stem)`` (never by
extension), ``validate_candidate`` checks each pair, ``make_safe_ids`` gives file-name-safe ids
and ``assign_splits`` gives each sample a split that never changes once assigned.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import pandas as pd

from modules.core.errors import PipelineError, error_line, printable
from modules.core.paths import manifest_path
from modules.core.progress import track
from modules.data.imageio import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    ImageReadError,
    MaskNotTwoDError,
    MaskReadError,
    has_extension,
    probe_image,
    read_image_rgb,
    read_mask,
    resize_mask_nearest,
)
from modules.data.manifest_checksums import verify_manifest

SPLITS = ("train", "val", "test")

# Column order of the valid-sample table (``all_samples.csv``) and the invalid one.
MANIFEST_COLUMNS = (
    "sample_id",
    "safe_id",
    "split",
    "group",
    "stem",
    "image_path",
    "mask_path",
    "image_h",
    "image_w",
    "mask_h",
    "mask_w",
    "size_mismatch",
    "foreground_fraction",
    "image_mode",
    "mask_format",
)
INVALID_COLUMNS = ("sample_id", "group", "stem", "image_path", "mask_path", "reason", "detail")

# Machine-readable reason codes of ``InvalidRecord.reason``, in the order they
# are checked (a sample gets the first one that applies).
INVALID_REASONS = {
    "undecodable_name": "the group or file name is not valid UTF-8 (rename it); the row shows it escaped",
    "missing_image": "a mask without an image of the same group and stem",
    "missing_mask": "an image without a mask of the same group and stem",
    "ambiguous_image": "several image files share the group and stem (e.g. a.png and a.jpg)",
    "ambiguous_mask": "several mask files share the group and stem",
    "unreadable_image": "the image is not a decodable image (truncated, corrupt, unsupported mode)",
    "image_too_small": "the image's shorter side is below min_image_side",
    "unreadable_mask": "the mask is not decodable (truncated, corrupt, unsupported dtype or mode)",
    "mask_not_2d": "a .npy mask whose array is not 2-D",
    "empty_mask": "the mask has no foreground pixel",
    "full_mask": "the mask has no background pixel",
    "mask_shape_mismatch": "the mask's sides are not the image's scaled by one factor (transposed, or "
                           "another image's mask)",
}

_SAFE_CHARACTER = re.compile(r"[^A-Za-z0-9._-]")
_SAFE_ID_SEPARATOR = "__"
# Longest safe id before the stem part is cut and a hash appended; keeps
# derived names (``<safe_id>/promptset_0003/...``) well under 255 bytes.
_SAFE_ID_MAX_CHARS = 120
_SAFE_ID_HASH_CHARS = 8


# ---------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A ``(group, stem)`` found on disk, with whatever files matched it.

    ``image_path`` / ``mask_path`` are None when no file or several files
    matched; in the latter case all of them are in ``ambiguous_image_paths`` /
    ``ambiguous_mask_paths`` (sorted), which are otherwise empty. ``unsupported_paths``:
    same-stem files in a format stage 1 does not read (``photo.webp``), named in a missing-file row.
    """

    group: str
    stem: str
    image_path: Path | None
    mask_path: Path | None
    ambiguous_image_paths: tuple[Path, ...] = ()
    ambiguous_mask_paths: tuple[Path, ...] = ()
    unsupported_paths: tuple[Path, ...] = ()

    @property
    def sample_id(self) -> str:
        return f"{self.group}/{self.stem}"


# (group, stem) -> every matching file.
FilesByKey = dict[tuple[str, str], list[Path]]


def _is_visible(entry: Path) -> bool:
    return not entry.name.startswith(".")


def _collect_files(folder: Path, group: str, found: FilesByKey) -> None:
    """Add the visible files directly inside ``folder`` (``scan_pairs`` sorts out the extensions)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if _is_visible(entry) and entry.is_file():
            found[(group, entry.stem)].append(entry)


def _group_folders(root: Path) -> list[Path]:
    """Visible sub-folders of ``root``; loose files directly in ``root`` belong to no group."""
    return sorted(entry for entry in root.iterdir() if _is_visible(entry) and entry.is_dir())


def _scan_split_roots(images_root: Path, masks_root: Path | None) -> tuple[FilesByKey, FilesByKey]:
    if masks_root is None:
        raise ValueError("layout 'split_roots' needs data.masks_root")
    _require_folder(masks_root, "masks_root")
    images: FilesByKey = defaultdict(list)
    masks: FilesByKey = defaultdict(list)
    for group_folder in _group_folders(images_root):
        _collect_files(group_folder, group_folder.name, images)
    for group_folder in _group_folders(masks_root):
        _collect_files(group_folder, group_folder.name, masks)
    return images, masks


def _scan_per_group(images_root: Path, masks_root: Path | None) -> tuple[FilesByKey, FilesByKey]:
    images: FilesByKey = defaultdict(list)
    masks: FilesByKey = defaultdict(list)
    for group_folder in _group_folders(images_root):
        _collect_files(group_folder / "images", group_folder.name, images)
        _collect_files(group_folder / "masks", group_folder.name, masks)
    return images, masks


@dataclass(frozen=True)
class Layout:
    """How a dataset folder is organised; ``scan`` returns (image files, mask files) by key."""

    description: str
    scan: Callable[[Path, Path | None], tuple[FilesByKey, FilesByKey]]


LAYOUTS: dict[str, Layout] = {
    "split_roots": Layout(
        description="images_root/<group>/<stem>.<ext> and masks_root/<group>/<stem>.<ext>",
        scan=_scan_split_roots,
    ),
    "per_group": Layout(
        description="images_root/<group>/images/<stem>.<ext> and images_root/<group>/masks/<stem>.<ext>"
        " (masks_root unused)",
        scan=_scan_per_group,
    ),
}


def _require_folder(path: Path, config_key: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"data.{config_key} {path}: not an existing folder")


def _absolute(path: str | os.PathLike) -> Path:
    # abspath normalises ".." without resolving symlinks, so the stored paths
    # stay the ones the user configured.
    return Path(os.path.abspath(path))


def scan_pairs(layout: str, images_root: str | os.PathLike, masks_root: str | os.PathLike | None) -> list[Candidate]:
    """Find every ``(group, stem)`` with an image or a mask file under the roots.

    Hidden files and folders (name starting with ``.``) and files whose
    extension is not in ``IMAGE_EXTENSIONS`` / ``MASK_EXTENSIONS`` (matched
    case-insensitively) are ignored, but for ``unsupported_paths``. Paths are absolute.

    Returns:
        Candidates sorted by ``(group, stem)``.

    Raises:
        ValueError: unknown ``layout``, or ``split_roots`` without ``masks_root``.
        FileNotFoundError: a root that is not an existing folder.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout {layout!r} is unknown; choose one of {sorted(LAYOUTS)}")
    images_root = _absolute(images_root)
    _require_folder(images_root, "images_root")
    masks_root = None if masks_root is None else _absolute(masks_root)
    all_images, all_masks = LAYOUTS[layout].scan(images_root, masks_root)
    images = {key: [p for p in files if has_extension(p, IMAGE_EXTENSIONS)] for key, files in all_images.items()}
    masks = {key: [p for p in files if has_extension(p, MASK_EXTENSIONS)] for key, files in all_masks.items()}

    candidates = []
    for group, stem in sorted(key for key in set(images) | set(masks) if images.get(key) or masks.get(key)):
        image_files = sorted(images.get((group, stem), []))
        mask_files = sorted(masks.get((group, stem), []))
        others = all_images.get((group, stem), []) + all_masks.get((group, stem), [])
        candidates.append(
            Candidate(
                group=group,
                stem=stem,
                image_path=image_files[0] if len(image_files) == 1 else None,
                mask_path=mask_files[0] if len(mask_files) == 1 else None,
                ambiguous_image_paths=tuple(image_files) if len(image_files) > 1 else (),
                ambiguous_mask_paths=tuple(mask_files) if len(mask_files) > 1 else (),
                unsupported_paths=tuple(sorted(set(others) - set(image_files) - set(mask_files))),
            )
        )
    return candidates


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRecord:
    """A valid image/mask pair.

    Sizes are in pixels in the displayed (EXIF-oriented) frame. When the mask
    size differs from the image size (``size_mismatch``), later stages resize
    the mask with ``imageio.resize_mask_nearest``. ``foreground_fraction`` is
    measured at the mask's own resolution. ``safe_id`` is None until
    ``make_safe_ids`` has seen every sample id (collisions need all of them);
    ``build_manifest_tables`` fills it in.
    """

    sample_id: str
    group: str
    stem: str
    image_path: str
    mask_path: str
    image_h: int
    image_w: int
    mask_h: int
    mask_w: int
    size_mismatch: bool
    foreground_fraction: float
    image_mode: str  # PIL mode of the stored pixels, e.g. "RGB", "L", "I;16"
    mask_format: str  # lower-case extension without the dot, e.g. "png", "npy"
    safe_id: str | None = None


@dataclass(frozen=True)
class InvalidRecord:
    """A ``(group, stem)`` that cannot be used; paths are ``""`` where no single file exists."""

    sample_id: str
    group: str
    stem: str
    image_path: str
    mask_path: str
    reason: str  # a key of INVALID_REASONS
    detail: str  # one human-readable line


def is_utf8_text(text: str) -> bool:
    """False for a name the file system gave as bytes that are not UTF-8 (see ``printable``)."""
    return printable(text) == text


def _path_text(path: Path | None) -> str:
    return "" if path is None else printable(str(path))


def _invalid(candidate: Candidate, reason: str, detail: str) -> InvalidRecord:
    return InvalidRecord(
        sample_id=printable(candidate.sample_id),
        group=printable(candidate.group),
        stem=printable(candidate.stem),
        image_path=_path_text(candidate.image_path),
        mask_path=_path_text(candidate.mask_path),
        reason=reason,
        detail=printable(detail),
    )


def _is_rescaled_frame(image_hw: tuple[int, int], mask_hw: tuple[int, int]) -> bool:
    """True when the mask's sides are the image's times one factor, up to one pixel of rounding
    on each side of the smaller of the two (``h_m * w - w_m * h`` is then at most ``h + w``)."""
    (image_h, image_w), (mask_h, mask_w) = image_hw, mask_hw
    tolerance = min(image_h + image_w, mask_h + mask_w)
    return abs(mask_h * image_w - mask_w * image_h) <= tolerance


def _file_names(paths: Iterable[Path]) -> str:
    return ", ".join(path.name for path in paths)


def _unsupported_note(candidate: Candidate) -> str:
    if not candidate.unsupported_paths:
        return ""
    return f"; found {_file_names(candidate.unsupported_paths)}, in a format stage 1 does not read: convert it"


def validate_candidate(
    candidate: Candidate, mask_threshold: int, min_image_side: int
) -> SampleRecord | InvalidRecord:
    """Decode both files of a candidate and check them.

    The checks run in the order of ``INVALID_REASONS``; the first failing one
    decides the reason. The image is fully decoded (so truncated files are
    caught here), the mask is read with ``imageio.read_mask`` and
    ``mask_threshold``. A mask of another size than its image must be a
    rescaled copy of the image's frame, and must keep foreground and
    background once resized to the image (as later stages use it).

    Args:
        candidate: one entry of ``scan_pairs``.
        mask_threshold: 8-bit grey threshold for image masks (see ``read_mask``).
        min_image_side: smallest allowed shorter image side, pixels.
    """
    if not is_utf8_text(candidate.sample_id):
        return _invalid(candidate, "undecodable_name",
                        f"{candidate.sample_id}: the group or file name is not valid UTF-8; rename it")
    if candidate.ambiguous_image_paths:
        return _invalid(
            candidate, "ambiguous_image",
            f"ambiguous: {len(candidate.ambiguous_image_paths)} image files for one stem "
            f"({_file_names(candidate.ambiguous_image_paths)})",
        )
    if candidate.ambiguous_mask_paths:
        return _invalid(
            candidate, "ambiguous_mask",
            f"ambiguous: {len(candidate.ambiguous_mask_paths)} mask files for one stem "
            f"({_file_names(candidate.ambiguous_mask_paths)})",
        )
    if candidate.image_path is None:
        return _invalid(candidate, "missing_image", f"no image file for mask {candidate.mask_path}"
                        + _unsupported_note(candidate))
    if candidate.mask_path is None:
        return _invalid(candidate, "missing_mask", f"no mask file for image {candidate.image_path}"
                        + _unsupported_note(candidate))

    try:
        image_header = probe_image(candidate.image_path)
        image_h, image_w = read_image_rgb(candidate.image_path).shape[:2]
    except ImageReadError as error:
        return _invalid(candidate, "unreadable_image", str(error))
    if min(image_h, image_w) < min_image_side:
        return _invalid(
            candidate, "image_too_small",
            f"image is {image_h} x {image_w} px, shorter side below min_image_side={min_image_side}",
        )

    try:
        mask = read_mask(candidate.mask_path, threshold=mask_threshold)
    except MaskNotTwoDError as error:
        return _invalid(candidate, "mask_not_2d", str(error))
    except MaskReadError as error:
        return _invalid(candidate, "unreadable_mask", str(error))
    foreground_pixels = int(mask.sum())
    if foreground_pixels == 0:
        return _invalid(candidate, "empty_mask", f"mask {mask.shape[0]} x {mask.shape[1]} has no foreground pixel")
    if foreground_pixels == mask.size:
        return _invalid(candidate, "full_mask", f"mask {mask.shape[0]} x {mask.shape[1]} has no background pixel")

    mask_h, mask_w = mask.shape
    if (mask_h, mask_w) != (image_h, image_w):
        if not _is_rescaled_frame((image_h, image_w), (mask_h, mask_w)):
            return _invalid(
                candidate, "mask_shape_mismatch",
                f"mask is {mask_h} x {mask_w} px, image {image_h} x {image_w} px: not one scale factor",
            )
        at_image_size = resize_mask_nearest(mask, (image_h, image_w))
        if not at_image_size.any():
            return _invalid(candidate, "empty_mask",
                            f"mask {mask_h} x {mask_w} has no foreground pixel at image size {image_h} x {image_w}")
        if at_image_size.all():
            return _invalid(candidate, "full_mask",
                            f"mask {mask_h} x {mask_w} has no background pixel at image size {image_h} x {image_w}")
    return SampleRecord(
        sample_id=candidate.sample_id,
        group=candidate.group,
        stem=candidate.stem,
        image_path=str(candidate.image_path),
        mask_path=str(candidate.mask_path),
        image_h=int(image_h),
        image_w=int(image_w),
        mask_h=int(mask_h),
        mask_w=int(mask_w),
        size_mismatch=(mask_h, mask_w) != (image_h, image_w),
        foreground_fraction=foreground_pixels / mask.size,
        image_mode=image_header.mode,
        mask_format=candidate.mask_path.suffix.lower().lstrip("."),
    )


# ---------------------------------------------------------------------------
# Safe ids
# ---------------------------------------------------------------------------


def _sanitize(text: str) -> str:
    return _SAFE_CHARACTER.sub("_", text)


def _id_hash(sample_id: str, length: int) -> str:
    return hashlib.sha256(sample_id.encode("utf-8")).hexdigest()[:length]


def make_safe_ids(sample_ids: Iterable[str], existing: Mapping[str, str] | None = None) -> dict[str, str]:
    """Map canonical ids ``"<group>/<stem>"`` to unique file-name-safe ids.

    The safe id is ``<group>__<stem>`` with every character outside
    ``[A-Za-z0-9._-]`` replaced by ``_`` (a leading ``.`` too, so no safe id is
    a hidden file). When two ids would become equal after that, or equal up to
    letter case (case-insensitive file systems), or when the id is longer than
    ``_SAFE_ID_MAX_CHARS``, every id concerned gets ``_<8 hex chars>`` of the
    SHA-256 of its canonical id appended. The result depends only on the set
    of ids, not their order. ``existing`` (``sample_id -> safe_id`` of an earlier
    manifest) pins those ids: a sample keeps its safe id forever, so the files
    later stages wrote under it stay found; a new id that would collide with a
    pinned one gets the hash suffix instead.

    Raises:
        ValueError: an id without the ``/`` between group and stem.
    """
    unique_ids = sorted(set(sample_ids))
    bases: dict[str, str] = {}
    too_long: set[str] = set()
    for sample_id in unique_ids:
        group, separator, stem = sample_id.partition("/")
        if not separator:
            raise ValueError(f"sample id {sample_id!r} is not of the form '<group>/<stem>'")
        base = _sanitize(group) + _SAFE_ID_SEPARATOR + _sanitize(stem)
        if base.startswith("."):
            base = "_" + base[1:]
        if len(base) > _SAFE_ID_MAX_CHARS:
            base = base[:_SAFE_ID_MAX_CHARS]
            too_long.add(sample_id)
        bases[sample_id] = base

    base_counts = Counter(base.lower() for base in bases.values())
    hash_length = _SAFE_ID_HASH_CHARS
    while True:
        safe_ids = {
            sample_id: (
                f"{base}_{_id_hash(sample_id, hash_length)}"
                if base_counts[base.lower()] > 1 or sample_id in too_long
                else base
            )
            for sample_id, base in bases.items()
        }
        if existing:
            pinned = {sid: existing[sid] for sid in safe_ids if sid in existing}
            taken = {safe_id.lower() for safe_id in pinned.values()}
            for sample_id in sorted(set(safe_ids) - set(pinned)):
                candidate = safe_ids[sample_id]
                if candidate.lower() in taken:
                    candidate = f"{bases[sample_id]}_{_id_hash(sample_id, hash_length)}"
                pinned[sample_id] = candidate
                taken.add(candidate.lower())
            safe_ids = pinned
        if len({safe_id.lower() for safe_id in safe_ids.values()}) == len(safe_ids):
            return safe_ids
        # A hashed id happened to equal another id; the full hash cannot.
        hash_length = 64


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def _validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != len(SPLITS) or any(fraction < 0 for fraction in fractions):
        raise ValueError(f"data.split_fractions must be three non-negative numbers, got {tuple(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"data.split_fractions must sum to 1, got {tuple(fractions)} (sum {sum(fractions)})")
    return tuple(float(fraction) for fraction in fractions)  # type: ignore[return-value]


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights`` (Hamilton's method).

    Each share is ``floor(total * weight / sum)``; the units left over go to
    the largest fractional parts, ties to the earlier index. No share exceeds
    ``ceil(total * weight / sum)``.
    """
    weight_sum = sum(weights)
    if total == 0 or weight_sum == 0:
        return [0] * len(weights)
    exact = [total * weight / weight_sum for weight in weights]
    counts = [int(value) for value in exact]
    by_remainder = sorted(range(len(weights)), key=lambda index: (-(exact[index] - counts[index]), index))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def target_split_counts(n_samples: int, fractions: Sequence[float]) -> dict[str, int]:
    """How many of a group's ``n_samples`` each split should hold.

    Largest-remainder rounding of ``n_samples * fraction`` (ties go to the
    earlier split in ``SPLITS``). A group with at least 3 samples then gets at
    least one sample in every split whose fraction is positive, taken from the
    currently largest split.
    """
    fractions = _validate_fractions(fractions)
    counts = _largest_remainder(n_samples, fractions)
    if n_samples >= len(SPLITS):
        for index, fraction in enumerate(fractions):
            if fraction > 0 and counts[index] == 0:
                largest = max(range(len(SPLITS)), key=lambda other: (counts[other], -other))
                counts[largest] -= 1
                counts[index] += 1
    return dict(zip(SPLITS, counts))


def _split_order_key(seed: int, sample_id: str) -> str:
    # A keyed hash per sample: the order of new samples depends on the seed and
    # the ids only, never on input order or on other groups.
    return hashlib.sha256(f"{seed}\0{sample_id}".encode("utf-8")).hexdigest()


def assign_splits(
    records: Iterable[SampleRecord],
    existing: Mapping[str, str] | None,
    seed: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> dict[str, str]:
    """Assign every record a split, keeping the splits of ``existing`` samples.

    Per group: the target counts for the group's current size come from
    ``target_split_counts``; samples listed in ``existing`` keep their split
    (they never move); the new samples are shared among the splits in
    proportion to each split's deficit ``max(0, target - kept)``
    (largest-remainder rounding, so no split passes its target; when no kept
    split is already above its target, the group lands exactly on its
    targets). Which new sample goes
    where follows the order of a seeded hash of their ids. The result
    depends only on the seed, the fractions, the set of records and
    ``existing``.

    Args:
        records: valid samples (anything with ``sample_id`` and ``group``).
        existing: ``sample_id -> split`` from an earlier manifest, or None.
            Entries for samples not in ``records`` are ignored (dropped).
        seed: split seed.
        fractions: train, val, test fractions summing to 1.

    Returns:
        ``sample_id -> split`` for every record.

    Raises:
        ValueError: bad fractions, or an existing split name not in ``SPLITS``.
    """
    fractions = _validate_fractions(fractions)
    existing = dict(existing or {})
    unknown = {split for split in existing.values() if split not in SPLITS}
    if unknown:
        raise ValueError(f"existing splits contain unknown split names {sorted(unknown)}; expected {SPLITS}")

    ids_by_group: dict[str, set[str]] = defaultdict(set)
    for record in records:
        ids_by_group[record.group].add(record.sample_id)

    assignment: dict[str, str] = {}
    for group in sorted(ids_by_group):
        group_ids = ids_by_group[group]
        kept = {sample_id: existing[sample_id] for sample_id in group_ids if sample_id in existing}
        assignment.update(kept)
        new_ids = sorted(group_ids - kept.keys(), key=lambda sample_id: _split_order_key(seed, sample_id))
        if not new_ids:
            continue
        targets = target_split_counts(len(group_ids), fractions)
        kept_counts = Counter(kept.values())
        deficits = [max(0, targets[split] - kept_counts[split]) for split in SPLITS]
        # The deficits sum to at least len(new_ids) (the targets sum to the
        # group size), so no split is pushed past its target.
        new_counts = _largest_remainder(len(new_ids), deficits)
        new_id_iterator = iter(new_ids)
        for split, count in zip(SPLITS, new_counts):
            for _ in range(count):
                assignment[next(new_id_iterator)] = split
    return assignment


# ---------------------------------------------------------------------------
# The whole stage's logic
# ---------------------------------------------------------------------------


def build_manifest_tables(
    layout: str,
    images_root: str | os.PathLike,
    masks_root: str | os.PathLike | None,
    mask_threshold: int,
    min_image_side: int,
    split_seed: int,
    split_fractions: Sequence[float],
    existing_splits: Mapping[str, str] | None,
    progress: bool = True,
    existing_safe_ids: Mapping[str, str] | None = None,
    validate: Callable[[Candidate], SampleRecord | InvalidRecord] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scan, validate, name and split a dataset.

    Safe ids are computed over every scanned candidate, valid or not, so that
    fixing an invalid file later does not rename valid samples.

    Args:
        layout: a key of ``LAYOUTS``.
        images_root, masks_root: dataset folders (``masks_root`` may be None
            for ``per_group``).
        mask_threshold: see ``imageio.read_mask``.
        min_image_side: see ``validate_candidate``.
        split_seed, split_fractions, existing_splits: see ``assign_splits``.
        progress: show the progress over the pairs (``core.progress``).
        existing_safe_ids: safe ids of an earlier manifest, kept (see ``make_safe_ids``).
        validate: in place of ``validate_candidate`` (stage 1 passes ``ValidationMemo.validate``).

    Returns:
        ``(valid_df, invalid_df)`` with columns ``MANIFEST_COLUMNS`` and
        ``INVALID_COLUMNS``, rows sorted by ``sample_id``. Paths are absolute
        strings; missing paths in ``invalid_df`` are ``""``.
    """
    candidates = scan_pairs(layout, images_root, masks_root)
    valid: list[SampleRecord] = []
    invalid: list[InvalidRecord] = []
    for candidate in track(candidates, "validate pairs", unit="pairs", enabled=progress):
        result = validate(candidate) if validate else validate_candidate(candidate, mask_threshold, min_image_side)
        (valid if isinstance(result, SampleRecord) else invalid).append(result)

    # A name that is not UTF-8 gets no safe id: renaming the file is the only fix, and gives a new id.
    safe_ids = make_safe_ids((candidate.sample_id for candidate in candidates if is_utf8_text(candidate.sample_id)),
                             existing_safe_ids)
    valid = [replace(record, safe_id=safe_ids[record.sample_id]) for record in valid]
    splits = assign_splits(valid, existing_splits, split_seed, split_fractions)

    valid_rows = [{**asdict(record), "split": splits[record.sample_id]} for record in valid]
    valid_df = pd.DataFrame(valid_rows, columns=list(MANIFEST_COLUMNS))
    invalid_df = pd.DataFrame([asdict(record) for record in invalid], columns=list(INVALID_COLUMNS))
    return (
        valid_df.sort_values("sample_id", kind="stable").reset_index(drop=True),
        invalid_df.sort_values("sample_id", kind="stable").reset_index(drop=True),
    )


# ---------------------------------------------------------------------------
# Reading stage 1's outputs
# ---------------------------------------------------------------------------

#: Columns of a valid-sample manifest that later stages read as positive integers (pixels).
_INTEGER_COLUMNS = ("image_h", "image_w", "mask_h", "mask_w")


def read_manifest_csv(path: Path) -> pd.DataFrame:
    """A valid-sample manifest CSV as written by stage 1 (stems and groups stay strings, empty
    cells stay ""). One-line ``PipelineError`` naming the file when it is unreadable, lacks a
    column of ``MANIFEST_COLUMNS`` or holds a size that is not a positive integer, or when it is not
    what stage 1 wrote (``manifest_checksums``)."""
    verify_manifest(path)
    try:
        frame = pd.read_csv(path, keep_default_na=False, dtype={"stem": str, "group": str})
    except (OSError, ValueError) as error:  # pandas' ParserError and EmptyDataError, and UnicodeDecodeError
        raise PipelineError(f"{path}: unreadable manifest ({error_line(error)}); rerun build_manifests.py "
                            "(with --force if this is all_samples.csv)") from None
    missing = [column for column in MANIFEST_COLUMNS if column not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: not a manifest written by build_manifests.py (no column "
                            f"{', '.join(missing[:3])}); rerun it (with --force if this is all_samples.csv)")
    for column in _INTEGER_COLUMNS:
        if len(frame) and not (pd.api.types.is_integer_dtype(frame[column]) and (frame[column] > 0).all()):
            raise PipelineError(f"{path}: column {column} holds values that are no pixel count; "
                                "rerun build_manifests.py")
    return frame


def load_split_manifest(project_root: Path, split: str) -> pd.DataFrame:
    """The valid samples of one split (stage 1's output)."""
    path = manifest_path(project_root, split)
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run build_manifests.py first")
    return read_manifest_csv(path)


def split_manifest_paths(project_root: Path) -> list[Path]:
    return [manifest_path(project_root, split) for split in SPLITS]
