"""TTA transforms: exact inverses, prompts mapped onto the same pixels, seeded photometrics, and
``tta_predict`` end to end (a prompt-echo fake backbone for exactness, the demo SAM for plumbing)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modules.core.config import ConfigError
from modules.data.promptset import tight_box, to_frame256_box, to_frame256_points
from modules.sam.prompting import round_features
from modules.uncertainty.tta import (
    DIHEDRAL_TRANSFORMS,
    IDENTITY,
    PHOTOMETRIC_DEFAULTS,
    build_transform,
    build_transforms,
    transform_rng,
    tta_predict,
)
from tests.helpers.precompute_fixtures import save_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAINED_DEMO_CHECKPOINT = REPO / "assets" / "demo_backbone" / "demo_tiny.pt"
GEOMETRIC = ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "rescale_0.75", "rescale_1.25"]
DIHEDRAL = [name for name in GEOMETRIC if not name.startswith("rescale")]
HW = (37, 53)  # odd and non-square, so no transform can hide behind a symmetry


def blocky_mask(hw, seed, block=6):
    """A random mask made of ``block``-pixel squares (interior pixels are far from any edge)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((hw[0] // block + 1, hw[1] // block + 1)) < 0.4
    return np.kron(coarse, np.ones((block, block), dtype=bool))[: hw[0], : hw[1]]


def all_pixels(hw):
    rows, cols = np.mgrid[: hw[0], : hw[1]]
    return torch.from_numpy(np.stack([cols.ravel(), rows.ravel()], axis=1)).float()


# --------------------------------------------------------------------------- inverses and prompts


@pytest.mark.parametrize("name", GEOMETRIC)
def test_inverse_undoes_forward_exactly(name):
    transform = build_transform(name)
    logits = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    forwarded = transform.forward_logits(logits)
    assert torch.equal(transform.invert_logits(forwarded), logits)
    assert torch.equal(transform.forward_logits(transform.invert_logits(logits)), logits)
    # A permutation (flips, rotations) or the identity (rescale: FRAME256 is unchanged).
    assert torch.equal(forwarded.flatten().sort().values, logits.flatten().sort().values)
    moves_pixels = name in ("hflip", "vflip", "rot90", "rot180", "rot270")
    assert torch.equal(forwarded, logits) != moves_pixels


def test_named_rotations_compose_as_expected():
    logits = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))
    rot90, rot270 = DIHEDRAL_TRANSFORMS["rot90"], DIHEDRAL_TRANSFORMS["rot270"]
    hflip, vflip, rot180 = DIHEDRAL_TRANSFORMS["hflip"], DIHEDRAL_TRANSFORMS["vflip"], DIHEDRAL_TRANSFORMS["rot180"]
    assert torch.equal(rot90.invert_logits(logits), rot270.forward_logits(logits))
    assert torch.equal(rot90.forward_logits(rot90.forward_logits(logits)), rot180.forward_logits(logits))
    assert torch.equal(vflip.forward_logits(logits), logits.flip(-2))
    assert torch.equal(hflip.forward_logits(logits), logits.flip(-1))
    image = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    assert np.array_equal(rot90.apply_image(image), np.rot90(image))  # counter-clockwise
    assert np.array_equal(vflip.apply_image(image), image[::-1])


@pytest.mark.parametrize("name", DIHEDRAL)
def test_dihedral_points_and_boxes_land_on_the_same_pixels(name):
    transform = build_transform(name)
    mask = blocky_mask(HW, seed=3)
    image = np.random.default_rng(4).integers(0, 256, (*HW, 3), dtype=np.uint8)
    transformed_mask, transformed_image = transform.apply_mask(mask), transform.apply_image(image)
    out_hw = transform.output_hw(HW)
    assert transformed_mask.shape == out_hw and transformed_image.shape == (*out_hw, 3)

    points = all_pixels(HW)
    mapped = transform.map_points(points, HW)
    assert torch.equal(mapped, mapped.round())
    cols, rows = mapped[:, 0].long().numpy(), mapped[:, 1].long().numpy()
    src_cols, src_rows = points[:, 0].long().numpy(), points[:, 1].long().numpy()
    assert cols.min() >= 0 and rows.min() >= 0 and cols.max() < out_hw[1] and rows.max() < out_hw[0]
    assert np.array_equal(transformed_mask[rows, cols], mask[src_rows, src_cols])
    assert np.array_equal(transformed_image[rows, cols], image[src_rows, src_cols])
    assert len(set(zip(rows.tolist(), cols.tolist()))) == HW[0] * HW[1]  # a bijection

    box = torch.tensor([tight_box(mask)], dtype=torch.float32)
    assert transform.map_boxes(box, HW)[0].tolist() == list(tight_box(transformed_mask))


@pytest.mark.parametrize("name", GEOMETRIC)
def test_frame256_of_the_transformed_image_is_the_forwarded_original_frame(name):
    """The reason the logit inverse is exact: a point's FRAME256 position in the transformed image is
    its original FRAME256 position moved by the same transform acting on the 256 x 256 grid."""
    transform = build_transform(name)
    out_hw = transform.output_hw(HW)
    points = all_pixels(HW)
    in_transformed_frame = to_frame256_points(transform.map_points(points, HW).numpy(), *out_hw)
    original_frame = torch.from_numpy(to_frame256_points(points.numpy(), *HW)).float()
    moved_in_frame = transform.map_points(original_frame, (256, 256)) if name in DIHEDRAL else original_frame
    np.testing.assert_allclose(in_transformed_frame, moved_in_frame.numpy(), atol=1e-4)

    box = torch.tensor([[5.0, 7.0, 40.0, 20.0]])
    mapped_box = transform.map_boxes(box, HW)[0].tolist()
    in_transformed_frame = to_frame256_box(mapped_box, *out_hw)
    original_box = torch.tensor([to_frame256_box(box[0].tolist(), *HW)])
    if name in DIHEDRAL:  # edge coordinates: a flip maps edge u to 256 - u
        original_box = transform.map_boxes(original_box - torch.tensor([0.0, 0.0, 1.0, 1.0]), (256, 256))
        original_box = original_box + torch.tensor([0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(in_transformed_frame, original_box[0].numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["rescale_0.75", "rescale_1.25", "rescale_2"])
def test_rescaled_points_stay_inside_the_rescaled_mask(name):
    transform = build_transform(name)
    mask = blocky_mask((60, 84), seed=5, block=8)
    transformed = transform.apply_mask(mask)
    assert transformed.shape == transform.output_hw(mask.shape)
    # Interior pixels: the whole 5 x 5 neighbourhood agrees, so resampling cannot flip them.
    padded = np.pad(mask, 2, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (5, 5))
    interior = windows.all(axis=(-1, -2)) | (~windows).all(axis=(-1, -2))
    points = all_pixels(mask.shape)
    mapped = transform.map_points(points, mask.shape).round().long().numpy()
    inside = interior.ravel()
    src = points.long().numpy()
    assert np.array_equal(transformed[mapped[inside, 1], mapped[inside, 0]], mask[src[inside, 1], src[inside, 0]])
    box = transform.map_boxes(torch.tensor([tight_box(mask)], dtype=torch.float32), mask.shape)[0].numpy()
    np.testing.assert_allclose(box, np.array(tight_box(transformed)), atol=1.0)


def test_rescale_of_a_one_pixel_box_stays_valid():
    box = build_transform("rescale_0.5").map_boxes(torch.tensor([[10.0, 4.0, 10.0, 4.0]]), (20, 30))[0]
    assert box[2] >= box[0] and box[3] >= box[1]


# --------------------------------------------------------------------------- photometric and registry


@pytest.mark.parametrize("name", list(PHOTOMETRIC_DEFAULTS))
def test_photometric_is_seeded_and_keeps_geometry(name):
    transform = build_transform(name)
    image = np.random.default_rng(6).integers(0, 256, (*HW, 3), dtype=np.uint8)
    first = transform.apply_image(image, transform_rng(0, 11, 1))
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(first, transform.apply_image(image, transform_rng(0, 11, 1)))
    assert not np.array_equal(first, transform.apply_image(image, transform_rng(0, 11, 2)))
    assert not np.array_equal(first, image)
    logits = torch.randn(256, 256)
    assert torch.equal(transform.invert_logits(logits), logits)
    points = torch.tensor([[3.0, 4.0]])
    assert torch.equal(transform.map_points(points, HW), points)
    with pytest.raises(ValueError, match="seeded"):
        transform.apply_image(image)


def test_photometric_magnitude_zero_is_the_identity_and_ranges_are_checked():
    image = np.random.default_rng(7).integers(0, 256, (*HW, 3), dtype=np.uint8)
    assert np.array_equal(build_transform("brightness", {"brightness": 0.0}).apply_image(image, transform_rng(0, 0, 0)),
                          image)
    strong = build_transform("brightness", {"brightness": 0.9}).apply_image(image, transform_rng(0, 0, 0))
    weak = build_transform("brightness", {"brightness": 0.01}).apply_image(image, transform_rng(0, 0, 0))
    assert np.abs(strong.astype(int) - image).mean() > np.abs(weak.astype(int) - image).mean()
    with pytest.raises(ConfigError, match="tta.magnitudes.hue"):
        build_transform("hue", {"hue": 0.7})
    with pytest.raises(ConfigError, match="tta.magnitudes.contrast"):
        build_transform("contrast", {"contrast": -0.1})


def test_build_transforms_puts_one_clean_pass_first_and_rejects_unknown_names():
    transforms = build_transforms(["hflip", "identity", "brightness", "brightness", "rescale_0.75"])
    assert [t.name for t in transforms] == [IDENTITY, "hflip", "brightness", "brightness", "rescale_0.75"]
    assert [t.name for t in build_transforms([])] == [IDENTITY]
    with pytest.raises(ConfigError, match="unknown transform 'shear'"):
        build_transforms(["shear"])
    with pytest.raises(ConfigError, match="rescale_<positive number>"):
        build_transforms(["rescale_big"])
    with pytest.raises(ConfigError, match="rescale_<positive number>"):
        build_transforms(["rescale_-1"])
    with pytest.raises(ConfigError, match="tta.magnitudes: unknown key"):
        build_transforms(["hue"], {"sharpness": 0.1})


# --------------------------------------------------------------------------- tta_predict, exactness


class PromptEchoBackbone:
    """A fake backbone whose FRAME256 logits are known in closed form: the image's red channel
    stretched to 256 x 256 (bilinear) plus a bump at the first point and a plateau inside the box,
    both placed with the ``original_hw`` ``decode`` is given. Output 0 has the best predicted IoU."""

    device = torch.device("cpu")

    def __init__(self, with_image: bool = True):
        self.with_image = with_image
        self.encode_batches: list[int] = []
        self.decode_sets: list[int] = []

    def preprocess(self, image):
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
        return F.interpolate(pixels, (256, 256), mode="bilinear", align_corners=False)[0]

    def encode(self, images):
        self.encode_batches.append(int(images.shape[0]))
        return {"image_embed": images.clone()}

    def decode(self, features, original_hw, point_coords=None, point_labels=None, boxes=None, mask_input=None,
               multimask_output=True, dense_embedding_override=None):
        height, width = original_hw
        num_sets = point_coords.shape[0]
        self.decode_sets.append(num_sets)
        grid = torch.arange(256, dtype=torch.float32)
        u = (point_coords[:, 0, 0] + 0.5) * 256 / width - 0.5
        v = (point_coords[:, 0, 1] + 0.5) * 256 / height - 0.5
        bump = torch.exp(-((grid[None, None, :] - u[:, None, None]) ** 2 + (grid[None, :, None] - v[:, None, None]) ** 2) / 32)
        logits = 4 * bump - 3
        if boxes is not None:
            edges = boxes * torch.tensor([256 / width, 256 / height, 256 / width, 256 / height])
            edges[:, 2:] += torch.tensor([256 / width, 256 / height])
            centres = grid + 0.5
            inside_x = (centres[None, :] > edges[:, 0:1]) & (centres[None, :] < edges[:, 2:3])
            inside_y = (centres[None, :] > edges[:, 1:2]) & (centres[None, :] < edges[:, 3:4])
            logits = logits + 2 * (inside_y[:, :, None] & inside_x[:, None, :]).float()
        if self.with_image:
            logits = logits + torch.as_tensor(features["image_embed"]).reshape(-1, 3, 256, 256)[0, 0] / 64
        stacked = torch.stack([logits, logits - 5, logits + 5], dim=1)
        iou = torch.tensor([0.9, 0.2, 0.1]).expand(num_sets, 3)
        return (stacked, iou) if multimask_output else (stacked[:, :1], iou[:, :1])


def echo_prompts():
    points = torch.tensor([[[10.0, 5.0], [30.0, 20.0]], [[47.0, 33.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    boxes = torch.tensor([[4.0, 2.0, 30.0, 25.0], [20.0, 10.0, 52.0, 36.0]])
    return points, labels, boxes


def test_every_geometric_prediction_maps_back_onto_the_clean_one():
    image = np.random.default_rng(8).integers(0, 256, (*HW, 3), dtype=np.uint8)
    points, labels, boxes = echo_prompts()
    backbone = PromptEchoBackbone(with_image=True)
    transforms = build_transforms(DIHEDRAL)
    probs = tta_predict(backbone, image, points, labels, boxes, transforms, "points_and_box", "best_iou",
                        encoder_batch_size=4, fp16_features=False)
    assert probs.shape == (len(DIHEDRAL), 2, 256, 256)
    for k in range(1, len(transforms)):
        torch.testing.assert_close(probs[k], probs[0], atol=2e-5, rtol=0)
    # Prompts (not the image) for every transform incl. rescales and photometrics.
    backbone = PromptEchoBackbone(with_image=False)
    transforms = build_transforms(GEOMETRIC + ["brightness", "hue"])
    probs = tta_predict(backbone, image, points, labels, boxes, transforms, "points_and_box", "best_iou",
                        encoder_batch_size=3, fp16_features=False)
    for k in range(1, len(transforms)):
        torch.testing.assert_close(probs[k], probs[0], atol=2e-5, rtol=0)
    # Without the inverse the predictions would NOT line up (the test can fail).
    assert (transforms[1].forward_logits(probs[0]) - probs[0]).abs().max() > 0.3


def test_encoder_runs_once_per_batch_and_the_decoder_once_per_image():
    image = np.random.default_rng(9).integers(0, 256, (*HW, 3), dtype=np.uint8)
    points, labels, boxes = echo_prompts()
    transforms = build_transforms(["hflip", "rot90", "brightness", "rescale_1.25"])
    backbone = PromptEchoBackbone()
    tta_predict(backbone, image, points, labels, boxes, transforms, "points", "best_iou", encoder_batch_size=2)
    assert backbone.encode_batches == [2, 2, 1]
    assert backbone.decode_sets == [2] * 5
    backbone = PromptEchoBackbone()
    clean = {"image_embed": backbone.preprocess(image)}
    tta_predict(backbone, image, points, labels, boxes, transforms, "points", "best_iou", encoder_batch_size=2,
                clean_features=clean)
    assert backbone.encode_batches == [2, 2]  # the clean pass reuses the cached features


def test_photometric_draws_depend_on_seed_and_sample_key_only():
    image = np.random.default_rng(10).integers(0, 256, (*HW, 3), dtype=np.uint8)
    points, labels, boxes = echo_prompts()
    transforms = build_transforms(["brightness", "brightness", "saturation"])

    def run(seed, key, batch):
        return tta_predict(PromptEchoBackbone(), image, points, labels, boxes, transforms, "points", "best_iou",
                           encoder_batch_size=batch, seed=seed, sample_key=key)

    reference = run(0, 5, 4)
    assert torch.equal(reference, run(0, 5, 1))  # batching does not change the draws
    assert not torch.equal(reference[1], reference[2])  # repeated transforms draw different factors
    assert not torch.equal(reference, run(1, 5, 4)) and not torch.equal(reference, run(0, 6, 4))


# --------------------------------------------------------------------------- tta_predict, demo SAM


@pytest.fixture(scope="module")
def demo_backbone(tmp_path_factory):
    from modules.sam.registry import load_backbone

    path = save_random_checkpoint("sam", "demo_tiny", tmp_path_factory.mktemp("ckpt") / "demo_tiny.pt", seed=0)
    return load_backbone("sam", "demo_tiny", path, "cpu")


class Spy:
    """Wraps a backbone, recording the batch size of every encode and decode call."""

    def __init__(self, backbone):
        self.backbone, self.encode_batches, self.decode_sets = backbone, [], []

    def __getattr__(self, name):
        return getattr(self.backbone, name)

    def encode(self, images):
        self.encode_batches.append(int(images.shape[0]))
        return self.backbone.encode(images)

    def decode(self, features, original_hw, point_coords=None, point_labels=None, boxes=None, **kwargs):
        self.decode_sets.append(int((point_coords if point_coords is not None else boxes).shape[0]))
        return self.backbone.decode(features, original_hw, point_coords, point_labels, boxes, **kwargs)


def test_demo_sam_shapes_batching_and_clean_pass(demo_backbone):
    image = np.random.default_rng(11).integers(0, 256, (*HW, 3), dtype=np.uint8)
    points, labels, boxes = echo_prompts()
    transforms = build_transforms(["rot90", "contrast"])
    spy = Spy(demo_backbone)
    probs = tta_predict(spy, image, points, labels, boxes, transforms, "points", "best_iou", encoder_batch_size=2)
    assert probs.shape == (3, 2, 256, 256) and probs.dtype == torch.float32
    assert probs.min() >= 0 and probs.max() <= 1
    assert spy.encode_batches == [2, 1] and spy.decode_sets == [2, 2, 2]

    features = round_features(demo_backbone.encode(demo_backbone.preprocess(image)[None]))
    logits, iou = demo_backbone.decode(features, HW, points, labels, None, multimask_output=True)
    best = logits[torch.arange(2), iou.argmax(dim=1)]
    torch.testing.assert_close(probs[0], torch.sigmoid(best), atol=1e-5, rtol=0)
    spy = Spy(demo_backbone)
    single = tta_predict(spy, image, points, labels, boxes, transforms[:1], "points", "single",
                         encoder_batch_size=1, clean_features={"image_embed": features["image_embed"][0]})
    assert spy.encode_batches == []
    logits, _ = demo_backbone.decode(features, HW, points, labels, None, multimask_output=False)
    torch.testing.assert_close(single[0], torch.sigmoid(logits[:, 0]), atol=1e-5, rtol=0)


@pytest.mark.skipif(not TRAINED_DEMO_CHECKPOINT.is_file(),
                    reason=f"needs the trained demo backbone {TRAINED_DEMO_CHECKPOINT} (written by tools/train_demo_backbone.py)")
def test_trained_demo_sam_flipped_predictions_agree_after_the_inverse():
    from modules.sam.registry import load_backbone
    from modules.data.demo_scenes import render_scene

    backbone = load_backbone("sam", "demo_tiny", TRAINED_DEMO_CHECKPOINT, "cpu")
    # An object well away from the image centre, so that a missing inverse would show.
    for seed in range(50):
        image, mask = render_scene("plain", seed, size=(200, 264))
        rows, cols = np.nonzero(mask)
        if abs(cols.mean() / 264 - 0.5) > 0.15 and abs(rows.mean() / 200 - 0.5) > 0.15:
            break
    inside = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    points = torch.tensor([[[float(cols[inside]), float(rows[inside])]]])
    labels = torch.tensor([[1]])
    boxes = torch.tensor([tight_box(mask)], dtype=torch.float32)
    transforms = build_transforms(["hflip", "rot90"])
    probs = tta_predict(backbone, image, points, labels, boxes, transforms, "points_and_box", "best_iou", 3)
    truth = F.interpolate(torch.from_numpy(mask).float()[None, None], (256, 256), mode="nearest")[0, 0] > 0.5

    def iou(prediction):
        return float((prediction & truth).sum() / (prediction | truth).sum().clamp_min(1))

    assert iou(probs[0, 0] > 0.5) > 0.3, "the trained demo backbone does not segment a plain scene"
    for k in (1, 2):  # mapped back, the augmented predictions sit on the object; left unmapped they would not
        aligned, unmapped = probs[k, 0] > 0.5, transforms[k].forward_logits(probs[k, 0]) > 0.5
        assert iou(aligned) > iou(unmapped) + 0.1, transforms[k].name
