"""Prompt jitter: bounds in the 1024-frame-scaled pixels, seeding, the labels of jittered points (kept
by default, read from masks at any resolution for ``own_mask`` and the oracle), and one batched
decoder call for all K x P prompt sets on the demo SAM."""

import numpy as np
import pytest
import torch

from modules.core.config import ConfigError
from modules.data.promptset import to_frame256_points
from modules.uncertainty.prompt_perturbation import (PerturbationMagnitudes, labels_at, perturbed_prompts,
                                                     prompt_perturbation_predict)
from modules.sam.prompting import round_features
from tests.helpers.precompute_fixtures import save_random_checkpoint

HW = (300, 500)  # longest side 500: 20 px in SAM's 1024 frame are 500 / 1024 * 20 = 9.77 px here
K = 40


def disc_mask(hw=HW, centre=(150, 200), radius=60):
    rows, cols = np.mgrid[: hw[0], : hw[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2


def prompts():
    """Three prompt sets; points on the disc's rim (labels can flip), at the image corner (clamping),
    and padding (-1)."""
    points = torch.tensor([
        [[200.0, 92.0], [140.0, 150.0], [0.0, 0.0]],    # rim (inside), rim (outside), corner negative
        [[200.0, 150.0], [499.0, 299.0], [0.0, 0.0]],   # centre, far corner (WRONG label 1), padding
        [[259.0, 150.0], [7.0, 7.0], [0.0, 0.0]],       # rim (inside), near corner, padding
    ])
    labels = torch.tensor([[1, 0, 0], [1, 1, -1], [1, 0, -1]])
    boxes = torch.tensor([[140.0, 90.0, 259.0, 209.0], [0.0, 0.0, 40.0, 30.0], [480.0, 200.0, 499.0, 299.0]])
    return points, labels, boxes


def test_sample_zero_is_the_original_and_jitter_respects_its_bounds():
    points, labels, boxes = prompts()
    mask = disc_mask()
    all_points, all_labels, all_boxes = perturbed_prompts(points, labels, boxes, HW, K, seed=0, sample_key="a",
                                                          label_masks=mask)
    assert all_points.shape == (K * 3, 3, 2) and all_labels.shape == (K * 3, 3) and all_boxes.shape == (K * 3, 4)
    all_points, all_labels, all_boxes = (t.reshape(K, 3, *t.shape[1:]) for t in (all_points, all_labels, all_boxes))
    assert torch.equal(all_points[0], points) and torch.equal(all_labels[0], labels) and torch.equal(all_boxes[0], boxes)

    scale = max(HW) / 1024
    valid = labels >= 0
    shift = (all_points - points).abs()
    assert shift[:, valid].max() <= 20 * scale + 1e-4
    assert shift[:, valid].max() > 0.9 * 20 * scale  # the jitter really uses its range
    assert (all_points[..., 0] >= 0).all() and (all_points[..., 0] <= HW[1] - 1).all()
    assert (all_points[..., 1] >= 0).all() and (all_points[..., 1] <= HW[0] - 1).all()
    assert torch.equal(all_points[:, ~valid], points[~valid].expand(K, -1, -1))  # padding untouched
    assert (all_labels[:, ~valid] == -1).all()

    # Labels read from the mask at the nearest pixel; the rim points flip sometimes.
    cols = all_points[..., 0].round().long().numpy()
    rows = all_points[..., 1].round().long().numpy()
    expected = torch.from_numpy(mask[rows, cols].astype(np.int64))
    assert torch.equal(all_labels[1:][:, valid], expected[1:][:, valid])
    rim = all_labels[1:, 0, 0]
    assert (rim == 1).any() and (rim == 0).any()

    sides = (boxes[:, 2:] - boxes[:, :2] + 1).repeat(1, 2)
    bound = torch.minimum(0.1 * sides, torch.tensor(20 * scale))
    box_shift = (all_boxes - boxes).abs()
    assert (box_shift <= bound + 1e-4).all()
    assert (box_shift.amax(dim=0) > 0.5 * bound).all()  # every coordinate moves (some are clamped)
    assert (all_boxes[..., 0] <= all_boxes[..., 2]).all() and (all_boxes[..., 1] <= all_boxes[..., 3]).all()
    assert (all_boxes >= 0).all() and (all_boxes[..., 2] <= HW[1] - 1).all() and (all_boxes[..., 3] <= HW[0] - 1).all()


def test_small_boxes_move_by_at_most_ten_percent_of_their_side_and_large_images_by_more_pixels():
    points = torch.tensor([[[700.0, 1000.0]]])
    labels = torch.tensor([[1]])
    boxes = torch.tensor([[690.0, 990.0, 719.0, 1039.0]])  # 30 x 50 px: bounds 3 and 5 px (< 40 px)
    all_points, _, all_boxes = perturbed_prompts(points, labels, boxes, (2048, 1500), 200, seed=3, sample_key=1)
    box_shift = (all_boxes - boxes).abs()
    assert box_shift[:, [0, 2]].max() <= 3.0 + 1e-4 and box_shift[:, [1, 3]].max() <= 5.0 + 1e-4
    assert box_shift[:, [0, 2]].max() > 2.7 and box_shift[:, [1, 3]].max() > 4.5
    # 20 px in the 1024 frame are 40 px at a longest side of 2048.
    shift = (all_points - points).abs()
    assert 36.0 < shift.max() <= 40.0 + 1e-4


def test_seeding():
    points, labels, boxes = prompts()

    def run(**kwargs):
        arguments = {"seed": 0, "sample_key": "img_1", "promptset_ids": [0, 1, 2], **kwargs}
        return perturbed_prompts(points, labels, boxes, HW, 6, **arguments)

    reference = run()
    assert all(torch.equal(a, b) for a, b in zip(reference, run()))
    for changed in (run(seed=1), run(sample_key="img_2"), run(promptset_ids=[5, 1, 2])):
        assert not torch.equal(reference[0], changed[0]) and not torch.equal(reference[2], changed[2])
    # A prompt set's copies depend on its own id only, not on the other prompt sets.
    alone = perturbed_prompts(points[1:2], labels[1:2], boxes[1:2], HW, 6, seed=0, sample_key="img_1",
                              promptset_ids=[1])
    for full, single in zip(reference, alone):
        assert torch.equal(full.reshape(6, 3, *full.shape[1:])[:, 1], single)


def test_zero_magnitudes_copy_the_prompt_and_bad_settings_are_rejected():
    points, labels, boxes = prompts()
    mask = disc_mask()
    zero = PerturbationMagnitudes(point_noise_px=0.0, box_noise_fraction=0.0, box_noise_max_px=0.0)
    all_points, all_labels, all_boxes = perturbed_prompts(points, labels, boxes, HW, 3, 0, 0, magnitudes=zero,
                                                          label_masks=mask)
    assert torch.equal(all_points, points.repeat(3, 1, 1)) and torch.equal(all_boxes, boxes.repeat(3, 1))
    # The original labels agree with the mask except the deliberately wrong one, which is re-read.
    relabelled = labels.clone()
    relabelled[1, 1] = 0
    assert torch.equal(all_labels[3:], relabelled.repeat(2, 1))
    with pytest.raises(ConfigError, match="num_samples"):
        perturbed_prompts(points, labels, boxes, HW, 0, 0, 0)
    with pytest.raises(ConfigError, match="point_noise_px"):
        PerturbationMagnitudes(point_noise_px=-1.0)


def test_jittered_points_keep_their_labels_unless_masks_are_given():
    points, labels, boxes = prompts()
    kept = perturbed_prompts(points, labels, boxes, HW, K, seed=0, sample_key="a")
    read = perturbed_prompts(points, labels, boxes, HW, K, seed=0, sample_key="a", label_masks=disc_mask())
    # The same jitter either way; only the labels differ, and by default they are the user's.
    assert torch.equal(kept[0], read[0]) and torch.equal(kept[2], read[2])
    assert torch.equal(kept[1], labels.repeat(K, 1))
    assert not torch.equal(read[1], kept[1])


def test_labels_at_reads_masks_of_any_resolution_at_the_nearest_pixel():
    mask = disc_mask()
    rng = np.random.default_rng(0)
    points = np.stack([rng.uniform(0, HW[1] - 1, (5, 3, 40)), rng.uniform(0, HW[0] - 1, (5, 3, 40))], axis=-1)
    # At the image's own size: the pixel at the rounded coordinates, for every prompt set alike.
    expected = mask[np.rint(points[..., 1]).astype(int), np.rint(points[..., 0]).astype(int)]
    assert np.array_equal(labels_at(points, mask, HW), expected.astype(np.int64))
    # One FRAME256 mask per prompt set (own_mask reads the cached first passes): each set reads its
    # own mask at the point's FRAME256 position (``to_frame256_points``, rounded).
    frames = np.zeros((3, 256, 256), bool)
    frames[0, :, :128] = True   # left half
    frames[1, :128] = True      # top half
    frames[2] = np.random.default_rng(1).random((256, 256)) > 0.5
    labels = labels_at(points, frames, HW)
    for p in range(3):
        at = np.rint(to_frame256_points(points[:, p].reshape(-1, 2), *HW)).astype(int).clip(0, 255)
        assert np.array_equal(labels[:, p].reshape(-1), frames[p, at[:, 1], at[:, 0]].astype(np.int64))
    assert labels[:, 0].min() == 0 and labels[:, 0].max() == 1  # both halves are hit
    with pytest.raises(ValueError, match="h x w"):
        labels_at(points, frames[:2], HW)


# --------------------------------------------------------------------------- demo SAM, one decode


class DecodeSpy:
    def __init__(self, backbone):
        self.backbone, self.decode_sets, self.encode_calls = backbone, [], 0

    def __getattr__(self, name):
        return getattr(self.backbone, name)

    def encode(self, images):
        self.encode_calls += 1
        return self.backbone.encode(images)

    def decode(self, features, original_hw, point_coords=None, point_labels=None, boxes=None, **kwargs):
        self.decode_sets.append(int((point_coords if point_coords is not None else boxes).shape[0]))
        return self.backbone.decode(features, original_hw, point_coords, point_labels, boxes, **kwargs)


@pytest.fixture(scope="module")
def demo_backbone(tmp_path_factory):
    from modules.sam.registry import load_backbone

    path = save_random_checkpoint("sam", "demo_tiny", tmp_path_factory.mktemp("ckpt") / "demo_tiny.pt", seed=0)
    return load_backbone("sam", "demo_tiny", path, "cpu")


def test_all_prompt_variants_in_one_decoder_call_and_sample_zero_is_the_plain_prediction(demo_backbone):
    hw = (48, 64)
    mask = disc_mask(hw, centre=(24, 30), radius=12)
    image = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    features = round_features(demo_backbone.encode(demo_backbone.preprocess(image)[None]))
    points = torch.tensor([[[30.0, 24.0], [5.0, 5.0]], [[33.0, 20.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    boxes = torch.tensor([[18.0, 12.0, 41.0, 35.0], [10.0, 10.0, 50.0, 40.0]])
    spy = DecodeSpy(demo_backbone)
    probs = prompt_perturbation_predict(spy, features, hw, points, labels, boxes, 3, "points_and_box",
                                        "best_iou", seed=0, sample_key="x", promptset_ids=[0, 1])
    assert probs.shape == (3, 2, 256, 256) and probs.dtype == torch.float32
    assert spy.decode_sets == [6] and spy.encode_calls == 0
    logits, iou = demo_backbone.decode(features, hw, points, labels, boxes, multimask_output=True)
    torch.testing.assert_close(probs[0], torch.sigmoid(logits[torch.arange(2), iou.argmax(dim=1)]), atol=1e-5, rtol=0)
    assert (probs[1:] - probs[:1]).abs().amax() > 1e-3  # the perturbed prompts change the prediction
    # Labels read from a mask change the copies (same jitter), not the unperturbed sample 0.
    relabelled = prompt_perturbation_predict(spy, features, hw, points, labels, boxes, 3, "points_and_box",
                                             "best_iou", seed=0, sample_key="x", promptset_ids=[0, 1],
                                             label_masks=~mask)
    assert spy.decode_sets == [6, 6] and torch.equal(relabelled[0], probs[0])
    assert (relabelled[1:] - probs[1:]).abs().amax() > 1e-3
