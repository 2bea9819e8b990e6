import numpy as np
import pytest
import torch

from modules.data.promptset import (
    clicked_promptset,
    clicked_record,
    frame256_to_pixels,
    PromptSpec,
    build_promptset_record,
    dumps_record,
    gaussian_prompt_maps,
    promptset_tensors,
    sample_key,
    tight_box,
    to_frame256_points,
)

SPEC = PromptSpec(min_pairs=1, max_pairs=10, prompt_seed=777, gaussian_sigma=8.0, box_jitter=0.0)


def blob_mask(h=120, w=200):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - 60) ** 2 / 30**2 + (xx - 90) ** 2 / 50**2) < 1


def record_for(sample_id, mask, num_sets=6, spec=SPEC):
    sample = {"sample_id": sample_id, "safe_id": sample_id.replace("/", "__")}
    return build_promptset_record(sample, "train", mask, num_sets, spec, {"mask_md5": "x"})


def test_points_fall_on_foreground_and_background_with_k_in_range():
    mask = blob_mask()
    record = record_for("g/a", mask, num_sets=20)
    ks = set()
    for ps in record["promptsets"]:
        k = ps["k"]
        ks.add(k)
        assert 1 <= k <= 10
        points = np.array(ps["points"])
        assert points.shape == (2 * k, 2)
        assert ps["labels"] == [1] * k + [0] * k
        assert mask[points[:k, 1], points[:k, 0]].all()
        assert not mask[points[k:, 1], points[k:, 0]].any()
        assert ps["box"] == list(tight_box(mask))
    assert len(ks) > 3  # k really varies


def test_same_config_gives_byte_identical_json_regardless_of_order():
    mask = blob_mask()
    first = [dumps_record(record_for(sid, mask)) for sid in ("g/a", "g/b", "h/c")]
    second = [dumps_record(record_for(sid, mask)) for sid in ("h/c", "g/b", "g/a")][::-1]
    assert first == second
    assert first[0] != first[1]  # different samples, different prompts
    # Asking for more prompt sets keeps the earlier ones unchanged.
    more = record_for("g/a", mask, num_sets=9)["promptsets"][:6]
    assert more == record_for("g/a", mask, num_sets=6)["promptsets"]
    assert sample_key("g/a") == sample_key("g/a") and sample_key("g/a") != sample_key("g/b")


def test_box_jitter_stays_inside_the_image_and_is_seeded():
    mask = blob_mask()
    spec = PromptSpec(1, 3, 5, 8.0, box_jitter=0.2)
    a = record_for("g/a", mask, spec=spec)
    assert a == record_for("g/a", mask, spec=spec)
    boxes = np.array([ps["box"] for ps in a["promptsets"]])
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert boxes.min() >= 0 and boxes[:, [0, 2]].max() < 200 and boxes[:, [1, 3]].max() < 120
    assert len({tuple(b) for b in boxes}) > 1


def test_frame256_maps_pixel_centres():
    pts = np.array([[0, 0], [199, 119]])
    out = to_frame256_points(pts, height=120, width=200)
    assert out[0] == pytest.approx([0.5 * 256 / 200 - 0.5, 0.5 * 256 / 120 - 0.5])
    assert out[1] == pytest.approx([255.5 - 0.5 * 256 / 200, 255.5 - 0.5 * 256 / 120])


def test_gaussian_prompt_maps_match_brute_force():
    points = torch.tensor([[[10.0, 20.0], [12.0, 22.0], [200.5, 100.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 1, 0, -1]])
    maps = gaussian_prompt_maps(points, labels, sigma=8.0)
    assert maps.shape == (1, 2, 256, 256) and maps.dtype == torch.float32
    yy, xx = np.mgrid[:256, :256]

    def gauss(x, y):
        return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 8.0**2))

    expected_pos = np.clip(gauss(10, 20) + gauss(12, 22), 0, 1)
    expected_neg = np.clip(gauss(200.5, 100), 0, 1)
    np.testing.assert_allclose(maps[0, 0].numpy(), expected_pos, atol=1e-5)
    np.testing.assert_allclose(maps[0, 1].numpy(), expected_neg, atol=1e-5)
    assert maps[0, 0].max() == pytest.approx(1.0)  # two close points saturate, clamped to 1
    assert maps[0, 0, 20, 10] == pytest.approx(1.0)


def test_promptset_tensors_pad_with_minus_one():
    record = record_for("g/a", blob_mask(), num_sets=5)
    points, labels, points_256, boxes = promptset_tensors(record)
    width = 2 * SPEC.max_pairs + 1  # canonical: independent of which prompt sets the record holds
    assert record["point_width"] == width
    assert points.shape == (5, width, 2) and labels.shape == (5, width) and boxes.shape == (5, 4)
    for i, ps in enumerate(record["promptsets"]):
        assert (labels[i, : 2 * ps["k"]] >= 0).all() and (labels[i, 2 * ps["k"]:] == -1).all()
    maps = gaussian_prompt_maps(points_256, labels, sigma=8.0)
    assert maps.shape == (5, 2, 256, 256)


def test_frame256_points_map_back_to_the_pixels_they_came_from():
    rng = np.random.default_rng(3)
    for height, width in [(300, 500), (100, 80), (256, 256), (1024, 777)]:
        pixels = np.stack([rng.integers(0, width, 500), rng.integers(0, height, 500)], axis=1)
        assert (frame256_to_pixels(to_frame256_points(pixels, height, width), height, width) == pixels).all()
    corners = frame256_to_pixels(np.array([[-3.0, -3.0], [300.0, 300.0]]), 40, 60)
    assert corners.tolist() == [[0, 0], [59, 39]]  # kept inside the image


def test_clicked_record_pads_like_a_drawn_record_and_rejects_bad_labels():
    first = clicked_promptset([[10, 20]], [1], None, 100, 200, promptset_id=0)
    second = clicked_promptset([[10, 20], [50, 60], [70, 80]], [1, 0, 1], (5, 5, 150, 90), 100, 200, promptset_id=1)
    record = clicked_record("img", "img", (100, 200), [first, second], gaussian_sigma=8.0, min_point_width=3)
    assert record["point_width"] == 4  # the widest set (3 clicks) plus one padding point
    points, labels, points_256, boxes = promptset_tensors(record)
    assert points.shape == (2, 4, 2) and labels[0].tolist() == [1, -1, -1, -1] and labels[1].tolist() == [1, 0, 1, -1]
    assert boxes[0].tolist() == [0, 0, 199, 99]  # no box: the whole image
    assert points_256[1, 1].tolist() == pytest.approx(to_frame256_points(np.array([[50, 60]]), 100, 200)[0], abs=1e-4)
    assert clicked_record("img", "img", (100, 200), [first], 8.0, min_point_width=9)["point_width"] == 9
    with pytest.raises(ValueError, match="each 0 or 1"):
        clicked_promptset([[1, 2]], [2], None, 10, 10)
