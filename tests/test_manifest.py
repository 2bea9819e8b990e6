"""manifest: scanning both layouts, validation reasons, safe ids and stable splits on real files."""

from __future__ import annotations

import importlib.util
import os
import random
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from modules.data import validation_memo
from modules.data.manifest import (
    INVALID_COLUMNS,
    INVALID_REASONS,
    LAYOUTS,
    MANIFEST_COLUMNS,
    SPLITS,
    SampleRecord,
    assign_splits,
    build_manifest_tables,
    make_safe_ids,
    scan_pairs,
    target_split_counts,
    validate_candidate,
)
from modules.data.sample_files import DataRoots
from modules.data.validation_memo import ValidationMemo
from tests.stage_runner import REPO

SIDE = 24
MIN_SIDE = 16
THRESHOLD = 127
_EXIF_ORIENTATION_TAG = 0x0112


def _disc(height: int = SIDE, width: int = SIDE, radius: float = 7) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    return (rows - height / 2 + 0.5) ** 2 + (cols - width / 2 + 0.5) ** 2 <= radius**2


def _write_image(path: Path, height: int = SIDE, width: int = SIDE, mode: str = "RGB", **save_args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(len(path.name)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    if mode == "I;16":
        image = Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257))
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, **save_args)


def _write_mask(path: Path, mask: np.ndarray) -> None:
    """Write a bool ``H x W`` mask in the format the suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, mask)
    elif path.suffix in (".jpg", ".jpeg"):
        rgb = np.repeat(mask[:, :, None].astype(np.uint8) * 255, 3, axis=2)
        Image.fromarray(rgb).save(path, quality=60)
    else:
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)


def _pair_paths(root: Path, layout: str, group: str, stem: str, image_suffix: str, mask_suffix: str):
    if layout == "split_roots":
        image_folder, mask_folder = root / "images" / group, root / "masks" / group
    else:
        image_folder, mask_folder = root / "data" / group / "images", root / "data" / group / "masks"
    return image_folder / f"{stem}{image_suffix}", mask_folder / f"{stem}{mask_suffix}"


def _roots(root: Path, layout: str) -> tuple[Path, Path | None]:
    if layout == "split_roots":
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        return root / "images", root / "masks"
    (root / "data").mkdir(parents=True, exist_ok=True)
    return root / "data", None


def _add_pair(root: Path, group: str, stem: str, layout: str = "split_roots", image_suffix: str = ".png",
              mask_suffix: str = ".png", mask: np.ndarray | None = None) -> None:
    image_path, mask_path = _pair_paths(root, layout, group, stem, image_suffix, mask_suffix)
    _write_image(image_path)
    _write_mask(mask_path, _disc() if mask is None else mask)


def _build(root: Path, layout: str = "split_roots", existing=None, seed: int = 123):
    images_root, masks_root = _roots(root, layout)
    return build_manifest_tables(
        layout=layout,
        images_root=images_root,
        masks_root=masks_root,
        mask_threshold=THRESHOLD,
        min_image_side=MIN_SIDE,
        split_seed=seed,
        split_fractions=(0.8, 0.1, 0.1),
        existing_splits=existing,
        progress=False,
    )


def _reasons(invalid_df) -> dict[str, str]:
    return dict(zip(invalid_df["sample_id"], invalid_df["reason"]))


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


def test_every_mask_format_gives_a_valid_sample(tmp_path):
    truth = _disc()
    formats = {
        "png_0_255": (".png", lambda path: Image.fromarray(truth.astype(np.uint8) * 255, "L").save(path)),
        "png_0_1": (".png", lambda path: Image.fromarray(truth.astype(np.uint8), "L").save(path)),
        "jpg_rgb": (".jpg", lambda path: _write_mask(path, truth)),
        "bmp": (".bmp", lambda path: _write_mask(path, truth)),
        "tif": (".tif", lambda path: _write_mask(path, truth)),
        "npy_bool": (".npy", lambda path: np.save(path, truth)),
        "npy_uint8": (".npy", lambda path: np.save(path, truth.astype(np.uint8) * 9)),
        "npy_float32": (".npy", lambda path: np.save(path, np.where(truth, 0.7, -0.3).astype(np.float32))),
        "npy_int64": (".npy", lambda path: np.save(path, np.where(truth, 4, 0).astype(np.int64))),
    }
    for stem, (suffix, write) in formats.items():
        image_path, mask_path = _pair_paths(tmp_path, "split_roots", "g", stem, ".png", suffix)
        _write_image(image_path)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        write(mask_path)

    valid_df, invalid_df = _build(tmp_path)
    assert invalid_df.empty, invalid_df.to_dict("records")
    rows = valid_df.set_index("stem")
    assert set(rows.index) == set(formats)
    for stem, (suffix, _) in formats.items():
        assert rows.loc[stem, "mask_format"] == suffix.lstrip(".")
        expected_fraction = truth.mean()
        tolerance = 0.02 if suffix == ".jpg" else 1e-9
        assert abs(rows.loc[stem, "foreground_fraction"] - expected_fraction) <= tolerance


def test_image_modes_and_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION_TAG] = 6
    cases = {
        "grey": ("L", ".png", {}),
        "rgba": ("RGBA", ".png", {}),
        "palette": ("P", ".png", {}),
        "deep": ("I;16", ".png", {}),
    }
    for stem, (mode, suffix, save_args) in cases.items():
        image_path, mask_path = _pair_paths(tmp_path, "split_roots", "g", stem, suffix, ".png")
        _write_image(image_path, mode=mode, **save_args)
        _write_mask(mask_path, _disc())
    # Stored 20 x 32, displayed 32 x 20; the mask is drawn in the displayed frame.
    image_path, mask_path = _pair_paths(tmp_path, "split_roots", "g", "rotated", ".jpg", ".png")
    _write_image(image_path, height=20, width=32, exif=exif.tobytes())
    _write_mask(mask_path, _disc(32, 20, 6))

    valid_df, invalid_df = _build(tmp_path)
    assert invalid_df.empty, invalid_df.to_dict("records")
    rows = valid_df.set_index("stem")
    assert rows.loc["grey", "image_mode"] == "L"
    assert rows.loc["rgba", "image_mode"] == "RGBA"
    assert rows.loc["palette", "image_mode"] == "P"
    assert rows.loc["deep", "image_mode"].startswith("I")
    assert (rows.loc["rotated", "image_h"], rows.loc["rotated", "image_w"]) == (32, 20)
    assert not rows.loc["rotated", "size_mismatch"]


# ---------------------------------------------------------------------------
# Invalid samples
# ---------------------------------------------------------------------------


def test_every_invalid_reason_is_detected(tmp_path):
    images_root, masks_root = _roots(tmp_path, "split_roots")
    _add_pair(tmp_path, "g", "good")

    truncated_image = images_root / "g" / "truncated.jpg"
    _write_image(truncated_image, 64, 64)
    truncated_image.write_bytes(truncated_image.read_bytes()[: truncated_image.stat().st_size // 2])
    _write_mask(masks_root / "g" / "truncated.png", _disc())

    _write_image(images_root / "g" / "no_mask.png")
    _write_mask(masks_root / "g" / "no_image.png", _disc())
    _add_pair(tmp_path, "g", "empty", mask=np.zeros((SIDE, SIDE), bool))
    _add_pair(tmp_path, "g", "full", mask=np.ones((SIDE, SIDE), bool))

    _write_image(images_root / "g" / "three_d.png")
    np.save(masks_root / "g" / "three_d.npy", _disc()[None])

    _write_image(images_root / "g" / "small.png", 8, 40)
    _write_mask(masks_root / "g" / "small.png", _disc(8, 40, 3))

    _write_image(images_root / "g" / "bad_mask.png")
    (masks_root / "g" / "bad_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    _write_image(images_root / "g" / "two_images.png")
    _write_image(images_root / "g" / "two_images.jpg")
    _write_mask(masks_root / "g" / "two_images.png", _disc())

    _write_image(images_root / "g" / "two_masks.png")
    _write_mask(masks_root / "g" / "two_masks.png", _disc())
    _write_mask(masks_root / "g" / "two_masks.npy", _disc())

    valid_df, invalid_df = _build(tmp_path)
    assert list(valid_df["sample_id"]) == ["g/good"]
    assert _reasons(invalid_df) == {
        "g/bad_mask": "unreadable_mask",
        "g/empty": "empty_mask",
        "g/full": "full_mask",
        "g/no_image": "missing_image",
        "g/no_mask": "missing_mask",
        "g/small": "image_too_small",
        "g/three_d": "mask_not_2d",
        "g/truncated": "unreadable_image",
        "g/two_images": "ambiguous_image",
        "g/two_masks": "ambiguous_mask",
    }
    assert set(invalid_df["reason"]) <= set(INVALID_REASONS)
    details = dict(zip(invalid_df["sample_id"], invalid_df["detail"]))
    assert "two_images.jpg" in details["g/two_images"] and "two_images.png" in details["g/two_images"]
    assert details["g/two_images"].startswith("ambiguous")
    assert "not 2-D, shape (1, 24, 24)" in details["g/three_d"]
    assert str(truncated_image) in details["g/truncated"]
    rows = invalid_df.set_index("sample_id")
    assert rows.loc["g/no_mask", "mask_path"] == "" and rows.loc["g/no_mask", "image_path"].endswith("no_mask.png")


def test_size_mismatch_is_recorded_on_a_valid_sample(tmp_path):
    _add_pair(tmp_path, "g", "half", mask=_disc(SIDE // 2, SIDE // 2, 4))
    _add_pair(tmp_path, "g", "same")
    valid_df, invalid_df = _build(tmp_path)
    assert invalid_df.empty
    rows = valid_df.set_index("stem")
    assert bool(rows.loc["half", "size_mismatch"]) is True
    assert (rows.loc["half", "mask_h"], rows.loc["half", "mask_w"]) == (SIDE // 2, SIDE // 2)
    assert (rows.loc["half", "image_h"], rows.loc["half", "image_w"]) == (SIDE, SIDE)
    assert bool(rows.loc["same", "size_mismatch"]) is False


def test_hidden_and_foreign_files_are_ignored(tmp_path):
    images_root, masks_root = _roots(tmp_path, "split_roots")
    _add_pair(tmp_path, "g", "kept", image_suffix=".JPG", mask_suffix=".PNG")
    (images_root / "g" / "notes.txt").write_text("x")
    (images_root / "g" / ".DS_Store").write_bytes(b"\0\0")
    _write_image(images_root / "g" / ".hidden.png")
    (masks_root / "g" / "kept.json").write_text("{}")
    _add_pair(tmp_path, ".trash", "old")
    valid_df, invalid_df = _build(tmp_path)
    assert list(valid_df["sample_id"]) == ["g/kept"]
    assert invalid_df.empty


# ---------------------------------------------------------------------------
# Layouts and tables
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_both_layouts_pair_by_group_and_stem(tmp_path, layout):
    _add_pair(tmp_path, "cat", "a", layout, ".jpg", ".npy")
    _add_pair(tmp_path, "cat", "b", layout, ".png", ".png")
    _add_pair(tmp_path, "dog", "a", layout, ".bmp", ".tif")
    valid_df, invalid_df = _build(tmp_path, layout)
    assert invalid_df.empty
    assert list(valid_df["sample_id"]) == ["cat/a", "cat/b", "dog/a"]
    assert list(valid_df["group"]) == ["cat", "cat", "dog"]
    for image_path, mask_path in zip(valid_df["image_path"], valid_df["mask_path"]):
        assert Path(image_path).is_absolute() and Path(image_path).is_file()
        assert Path(mask_path).is_absolute() and Path(mask_path).is_file()
        assert Path(image_path).stem == Path(mask_path).stem


def test_tables_have_documented_columns_and_absolute_paths_from_relative_roots(tmp_path, monkeypatch):
    _add_pair(tmp_path, "g", "a")
    _write_image(tmp_path / "images" / "g" / "lonely.png")
    monkeypatch.chdir(tmp_path)
    valid_df, invalid_df = build_manifest_tables(
        "split_roots", "images", "./masks", THRESHOLD, MIN_SIDE, 1, (0.8, 0.1, 0.1), None, progress=False
    )
    assert tuple(valid_df.columns) == MANIFEST_COLUMNS
    assert tuple(invalid_df.columns) == INVALID_COLUMNS
    assert valid_df.loc[0, "image_path"] == str(tmp_path / "images" / "g" / "a.png")
    assert valid_df.loc[0, "mask_path"] == str(tmp_path / "masks" / "g" / "a.png")
    assert invalid_df.loc[0, "image_path"] == str(tmp_path / "images" / "g" / "lonely.png")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stored_paths_are_relative_to_their_root_and_resolve_back(tmp_path, layout):
    """What the manifests store survives moving the data: only the configured roots change."""
    made, moved = tmp_path / "made", tmp_path / "moved"
    _add_pair(made, "cat", "a", layout, ".jpg", ".npy")
    valid_df, _ = _build(made, layout)
    images_root, masks_root = _roots(made, layout)

    def roots_under(folder: Path) -> DataRoots:
        return DataRoots.from_config(SimpleNamespace(
            images_root=folder / images_root.relative_to(made), layout=layout,
            masks_root=None if masks_root is None else folder / masks_root.relative_to(made)))

    stored = roots_under(made).store(valid_df)
    if layout == "split_roots":
        assert (stored.loc[0, "image_path"], stored.loc[0, "mask_path"]) == ("cat/a.jpg", "cat/a.npy")
    else:
        assert (stored.loc[0, "image_path"], stored.loc[0, "mask_path"]) == ("cat/images/a.jpg", "cat/masks/a.npy")
    assert roots_under(made).resolve(stored).equals(valid_df)

    shutil.copytree(made, moved)
    resolved = roots_under(moved).resolve(stored)
    assert [Path(resolved.loc[0, c]).relative_to(moved) for c in ("image_path", "mask_path")] == \
        [Path(valid_df.loc[0, c]).relative_to(made) for c in ("image_path", "mask_path")]
    assert all(Path(resolved.loc[0, c]).is_file() for c in ("image_path", "mask_path"))

    # A manifest from before relative paths (or a file outside its root) keeps its absolute path.
    assert roots_under(moved).resolve(valid_df).equals(valid_df)
    outside = tmp_path / "elsewhere.png"
    assert roots_under(made).stored_image(outside) == str(outside) and roots_under(made).image(str(outside)) == outside


def test_a_rerun_reuses_the_records_of_unchanged_valid_pairs_and_validates_the_rest(tmp_path, monkeypatch):
    """Stage 1's validation memo: a rerun decodes only what is new, changed or invalid, and the
    tables are the ones a full validation gives."""
    _add_pair(tmp_path, "cat", "a")
    _add_pair(tmp_path, "cat", "b")
    _write_image(tmp_path / "images" / "cat" / "lonely.png")  # no mask: invalid, validated every run
    images_root, masks_root = _roots(tmp_path, "split_roots")
    validated: list[str] = []
    monkeypatch.setattr(validation_memo, "validate_candidate",
                        lambda candidate, *settings: validated.append(candidate.sample_id)
                        or validate_candidate(candidate, *settings))

    def build(threshold: int = THRESHOLD, reuse: bool = True):
        validated.clear()
        memo = ValidationMemo(tmp_path / "memo.json", DataRoots(images_root, masks_root), threshold, MIN_SIDE, reuse)
        tables = build_manifest_tables("split_roots", images_root, masks_root, threshold, MIN_SIDE, 1,
                                       (0.8, 0.1, 0.1), None, progress=False, validate=memo.validate)
        memo.save()
        return tables, memo.reused

    (first_valid, first_invalid), reused = build()
    assert reused == 0 and validated == ["cat/a", "cat/b", "cat/lonely"]
    (valid, invalid), reused = build()
    assert reused == 2 and validated == ["cat/lonely"]
    assert valid.equals(first_valid) and invalid.equals(first_invalid)

    changed = tmp_path / "masks" / "cat" / "b.png"
    _write_mask(changed, _disc(radius=4))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    (valid, _), reused = build()
    assert reused == 1 and validated == ["cat/b", "cat/lonely"]
    assert valid.loc[1, "foreground_fraction"] < first_valid.loc[1, "foreground_fraction"]
    assert valid.equals(build_manifest_tables("split_roots", images_root, masks_root, THRESHOLD, MIN_SIDE, 1,
                                              (0.8, 0.1, 0.1), None, progress=False)[0])

    for settings in ({"threshold": THRESHOLD + 1}, {"reuse": False}):  # another threshold; --force
        assert build(**settings)[1] == 0 and len(validated) == 3


def test_the_stage_1_benchmark_checks_that_the_memo_gives_the_full_validation_tables(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_manifests", REPO / "benchmarks" / "bench_manifests.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["bench_manifests.py", "--scenes", "1", "--repeats", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert re.search(r"^6 pairs \((\d+) valid\), memo reused \1;", out, re.M) and "rerun with the memo" in out, out


def test_bad_layout_and_missing_roots_are_reported(tmp_path):
    with pytest.raises(ValueError, match="nested"):
        scan_pairs("nested", tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="images_root"):
        scan_pairs("split_roots", tmp_path / "absent", tmp_path)
    with pytest.raises(FileNotFoundError, match="masks_root"):
        scan_pairs("split_roots", tmp_path, tmp_path / "absent")


def test_validate_candidate_returns_typed_record(tmp_path):
    _add_pair(tmp_path, "g", "a")
    (candidate,) = scan_pairs("split_roots", tmp_path / "images", tmp_path / "masks")
    record = validate_candidate(candidate, THRESHOLD, MIN_SIDE)
    assert isinstance(record, SampleRecord)
    assert record.sample_id == "g/a" and record.safe_id is None
    assert record.foreground_fraction == pytest.approx(_disc().mean())


# ---------------------------------------------------------------------------
# Safe ids
# ---------------------------------------------------------------------------


def test_safe_ids_are_unique_valid_file_names(tmp_path):
    stems = ["plain", "with space", "a+b", "a_b", "café", "cafè", "日本", "A", "a", "x-y", ".dot"]
    sample_ids = [f"grp/{stem}" for stem in stems] + ["Grp/plain", "g r/p"]
    safe_ids = make_safe_ids(sample_ids)
    assert set(safe_ids) == set(sample_ids)
    values = list(safe_ids.values())
    assert len({value.lower() for value in values}) == len(values)
    for value in values:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", value) and not value.startswith(".")
        (tmp_path / value).mkdir()  # a real directory name
    assert safe_ids["grp/plain"] != "grp__plain"  # collides with Grp/plain up to case
    assert safe_ids["grp/A"] != "grp__A" and safe_ids["grp/a"] != "grp__a"
    assert safe_ids["grp/a+b"] != safe_ids["grp/a_b"]
    assert safe_ids["grp/with space"] == "grp__with_space"  # no collision, no hash
    assert make_safe_ids(reversed(sample_ids)) == safe_ids


def test_odd_stems_survive_the_whole_table(tmp_path):
    for stem in ["with space", "a+b", "a_b", "ünï", "A", "a"]:
        image_path, mask_path = _pair_paths(tmp_path, "split_roots", "g", stem, ".png", ".npy")
        _write_image(image_path)
        _write_mask(mask_path, _disc())
    valid_df, invalid_df = _build(tmp_path)
    if len(valid_df) < 6:  # a case-insensitive file system merges "A" and "a"
        pytest.skip("file system is case-insensitive")
    assert invalid_df.empty
    assert valid_df["safe_id"].str.lower().is_unique
    assert valid_df["safe_id"].str.fullmatch(r"[A-Za-z0-9._-]+").all()


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def _records(counts_by_group: dict[str, int], offset: int = 0) -> list[SampleRecord]:
    return [
        SampleRecord(
            sample_id=f"{group}/s{index:03d}", group=group, stem=f"s{index:03d}", image_path="", mask_path="",
            image_h=1, image_w=1, mask_h=1, mask_w=1, size_mismatch=False, foreground_fraction=0.5,
            image_mode="RGB", mask_format="png",
        )
        for group, count in counts_by_group.items()
        for index in range(offset, offset + count)
    ]


@pytest.mark.parametrize(
    "n_samples, expected",
    [(0, (0, 0, 0)), (1, (1, 0, 0)), (2, (2, 0, 0)), (3, (1, 1, 1)), (4, (2, 1, 1)), (10, (8, 1, 1)),
     (15, (12, 2, 1)), (25, (20, 3, 2))],
)
def test_target_split_counts_largest_remainder(n_samples, expected):
    counts = target_split_counts(n_samples, (0.8, 0.1, 0.1))
    assert tuple(counts[split] for split in SPLITS) == expected
    assert sum(counts.values()) == n_samples


def test_splits_are_stratified(tmp_path):
    counts_by_group = {"three": 3, "four": 4, "seven": 7, "twenty": 20, "two": 2}
    records = _records(counts_by_group)
    splits = assign_splits(records, None, seed=5)
    assert set(splits) == {record.sample_id for record in records}
    for group, count in counts_by_group.items():
        group_splits = [splits[record.sample_id] for record in records if record.group == group]
        expected = target_split_counts(count, (0.8, 0.1, 0.1))
        assert {split: group_splits.count(split) for split in SPLITS} == expected
        if count >= 3:
            assert set(group_splits) == set(SPLITS)


def test_splits_do_not_depend_on_input_order_but_on_seed():
    records = _records({"a": 30, "b": 12})
    splits = assign_splits(records, None, seed=11)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert assign_splits(shuffled, None, seed=11) == splits
    assert assign_splits(list(reversed(records)), {}, seed=11) == splits
    assert assign_splits(records, None, seed=12) != splits


def test_existing_splits_never_move_and_new_samples_move_counts_toward_target():
    old = _records({"a": 10, "b": 5})
    old_splits = assign_splits(old, None, seed=3)
    new = _records({"a": 10, "b": 5, "c": 4}, offset=100)
    merged = assign_splits(old + new, old_splits, seed=3)
    assert set(merged) == {record.sample_id for record in old + new}
    assert all(merged[sample_id] == split for sample_id, split in old_splits.items())
    group_a = [split for sample_id, split in merged.items() if sample_id.startswith("a/")]
    assert {split: group_a.count(split) for split in SPLITS} == target_split_counts(20, (0.8, 0.1, 0.1))
    group_c = [split for sample_id, split in merged.items() if sample_id.startswith("c/")]
    assert set(group_c) == set(SPLITS)


def test_existing_splits_are_kept_even_if_off_target_and_removed_samples_drop_out():
    records = _records({"a": 10})
    existing = {record.sample_id: "test" for record in records[:4]}
    existing["a/gone"] = "train"
    splits = assign_splits(records, existing, seed=0)
    assert "a/gone" not in splits
    assert all(splits[sample_id] == "test" for sample_id in existing if sample_id != "a/gone")
    new_splits = [splits[record.sample_id] for record in records[4:]]
    # Targets 8/1/1: test already has 4, so the 6 new samples go 5 train, 1 val.
    assert sorted(new_splits) == ["train"] * 5 + ["val"]


def test_bad_split_inputs_are_refused():
    records = _records({"a": 3})
    with pytest.raises(ValueError, match="unknown split"):
        assign_splits(records, {"a/s000": "validation"}, seed=0)
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(records, None, seed=0, fractions=(0.5, 0.1, 0.1))


def test_rebuilding_with_new_files_keeps_old_splits(tmp_path):
    for group, count in (("cat", 12), ("dog", 5)):
        for index in range(count):
            _add_pair(tmp_path, group, f"old{index:02d}", mask_suffix=".npy")
    first_df, _ = _build(tmp_path, seed=9)
    existing = dict(zip(first_df["sample_id"], first_df["split"]))
    assert set(first_df.loc[first_df["group"] == "dog", "split"]) == set(SPLITS)

    for group, count in (("cat", 6), ("bird", 3)):
        for index in range(count):
            _add_pair(tmp_path, group, f"new{index:02d}", mask_suffix=".npy")
    second_df, invalid_df = _build(tmp_path, existing=existing, seed=9)
    assert invalid_df.empty
    second = dict(zip(second_df["sample_id"], second_df["split"]))
    assert all(second[sample_id] == split for sample_id, split in existing.items())
    new_ids = set(second) - set(existing)
    assert len(new_ids) == 9 and all(second[sample_id] in SPLITS for sample_id in new_ids)
    assert set(second_df.loc[second_df["group"] == "bird", "split"]) == set(SPLITS)
    # Safe ids of untouched samples do not change either.
    first_safe = dict(zip(first_df["sample_id"], first_df["safe_id"]))
    second_safe = dict(zip(second_df["sample_id"], second_df["safe_id"]))
    assert all(second_safe[sample_id] == safe_id for sample_id, safe_id in first_safe.items())


def test_long_stems_are_cut_and_stay_unique():
    prefix = "x" * 300
    safe_ids = make_safe_ids([f"g/{prefix}1", f"g/{prefix}2"])
    first, second = safe_ids[f"g/{prefix}1"], safe_ids[f"g/{prefix}2"]
    assert first != second
    assert len(first) < 140 and len(second) < 140


def test_existing_safe_ids_stay_when_a_colliding_id_arrives():
    first = make_safe_ids(["g/a_b", "g/c"])
    assert first["g/a_b"] == "g__a_b"
    second = make_safe_ids(["g/a_b", "g/c", "g/a+b"], existing=first)
    assert second["g/a_b"] == "g__a_b" and second["g/c"] == "g__c"
    assert second["g/a+b"] != "g__a_b" and second["g/a+b"].startswith("g__a_b_")
    # Without pinning, both colliding ids would have been renamed.
    assert make_safe_ids(["g/a_b", "g/c", "g/a+b"])["g/a_b"] != "g__a_b"
