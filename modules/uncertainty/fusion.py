"""Dense embedding fusion: uncertainty-guided refinement of SAM's mask in one extra decoder pass.

``UncertaintyFusion`` fuses the prompt encoder's dense embedding of the first-pass logits with an
embedded uncertainty map; the result replaces the dense prompt embedding in one more pass of the
frozen mask decoder (``refine``). Only the fusion module trains, on cached image embeddings. Its
fuse conv starts as the identity on the mask embedding, so an untrained module reproduces SAM's
plain mask-prompt refinement. Uncertainty sources (``UNCERTAINTY_SOURCES``) map head inputs to
``B x 256 x 256`` maps in [0, 1] (FRAME256).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from modules.core.errors import PipelineError
from modules.data.promptset import load_promptsets, promptset_tensors
from modules.sam.prompting import PROMPT_MODES, Prompts, decode_selected
from modules.scoring.entropy import binary_entropy_from_logits
from modules.training.models import UncertaintyFusion, VarianceNetwork

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- refinement pass


def refine(backbone, fusion: UncertaintyFusion, features: dict, original_hw, prompts: Prompts,
           first_pass_logits: torch.Tensor, uncertainty: torch.Tensor, enable_grad: bool = False,
           multimask_policy: str = "single"):
    """One refinement pass for the P prompt sets of one image.

    ``multimask_policy`` (``fusion.multimask_policy``) picks the output kept: by default SAM's
    single-mask output, which is what SAM itself uses once a mask prompt resolves the ambiguity
    its multimask outputs are for.

    Args:
        prompts: the prompts that go into the decoder (already chosen by ``sam.prompt_mode``).
        features: the image's cached features (``Backbone.encode`` output for one image).
        first_pass_logits: ``P x 1 x 256 x 256`` FRAME256 logits of the first pass (or an oracle mask).
        uncertainty: ``P x 1 x 256 x 256`` FRAME256 uncertainty in [0, 1].
    Returns:
        ``(logits P x 1 x 256 x 256 FRAME256, iou_predictions P x 1)`` of the chosen output;
        differentiable w.r.t. the fusion module's parameters when ``enable_grad``.
    """
    mask_embedding = backbone.mask_embedding(first_pass_logits, original_hw)
    uncertainty_model_frame = backbone.from_frame256(uncertainty, original_hw, pad_value=0.0)
    with torch.set_grad_enabled(enable_grad):
        dense = fusion(mask_embedding, uncertainty_model_frame)
    selected = decode_selected(backbone, features, original_hw, prompts, None, multimask_policy,
                               dense_embedding_override=dense, enable_grad=enable_grad)
    return selected.logits[:, None], selected.iou_predictions.gather(1, selected.branch[:, None])


# --------------------------------------------------------------------------- uncertainty sources


UncertaintySource = Callable[[torch.Tensor], torch.Tensor]


def make_uncertainty_source(name: str, head=None, posterior=None, variance_network=None,
                            num_samples: int = 16, seed: int = 0, log_var_range=(-5.0, 5.0),
                            predictive: str = "mc") -> UncertaintySource:
    """A function ``head_inputs B x 3 x 256 x 256 -> uncertainty B x 256 x 256 in [0, 1]``
    (``predictive``: ``laplace.predictive`` for ``laplace_epistemic``)."""

    def raw_sam_entropy(x):
        return binary_entropy_from_logits(x[:, 0]) / LN2

    def map_entropy(x):
        return binary_entropy_from_logits(head(x)[:, 0]) / LN2

    def laplace_epistemic(x):
        return posterior.maps(x, predictive, num_samples, seed=seed)["mutual_information"].clamp(0, LN2) / LN2

    def variance_network_map(x):
        log_var = variance_network(VarianceNetwork.build_inputs(x, head(x)))[:, 0]
        low, high = log_var_range
        return ((log_var - low) / (high - low)).clamp(0, 1)

    def constant(x):
        return torch.full_like(x[:, 0], 0.5)

    sources = {"raw_sam_entropy": raw_sam_entropy, "map_entropy": map_entropy,
               "laplace_epistemic": laplace_epistemic, "variance_network": variance_network_map,
               "constant": constant}
    if name not in sources:
        raise PipelineError(f"fusion.uncertainty_source: {name!r} is not one of {', '.join(sources)}")
    needs = {"map_entropy": head, "laplace_epistemic": posterior, "variance_network": variance_network}
    if name in needs and needs[name] is None:
        raise PipelineError(f"fusion.uncertainty_source: {name!r} needs its trained model (head/Laplace/variance run)")
    return torch.no_grad()(sources[name])


UNCERTAINTY_SOURCES = ("laplace_epistemic", "map_entropy", "raw_sam_entropy", "variance_network", "constant")


# --------------------------------------------------------------------------- training data


def image_row_groups(row_images, max_rows: int = 0, seed: int = 0) -> list[list[int]]:
    """Rows grouped by image: ``row_images`` (the image number of each row) -> one sorted row list
    per image, images in order of first appearance.

    ``max_rows`` > 0 keeps whole images, drawn in a seeded random order, while their rows add up to
    at most ``max_rows`` (at least one image); the kept images stay in their original order.
    """
    groups: dict[int, list[int]] = {}
    for row, image in enumerate(row_images):
        groups.setdefault(int(image), []).append(row)
    ordered = list(groups.values())
    if not max_rows or sum(map(len, ordered)) <= max_rows:
        return ordered
    kept, total = [], 0
    for position in torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist():
        if kept and total + len(ordered[position]) > max_rows:
            continue
        kept.append(position)
        total += len(ordered[position])
    return [ordered[position] for position in sorted(kept)]


class FusionDataset(torch.utils.data.Dataset):
    """The packed rows of a split, one item per image, joined with what a refinement pass needs.

    Item ``i`` (the rows of ``groups[i]``, R of them, all of one image): ``inputs R x 3 x 256 x 256``
    (clipped SAM logits = the first pass, prompt maps), ``target R x 1 x 256 x 256``, ``features``
    (dict of ``C x h x w`` float32 from the SAM cache), ``point_coords R x N x 2``, ``point_labels
    R x N`` (canonical padding), ``box R x 4`` (original pixels) and ``original_hw (2,)``.
    ``max_rows`` / ``seed``: see ``image_row_groups``. Batch items with ``collate_images``, so that
    a training step decodes all prompt sets of an image in one decoder call.
    """

    def __init__(self, packed, cache, project_root, max_rows: int = 0, seed: int = 0):
        self.packed = packed
        self.cache = cache
        self.project_root = project_root
        self.groups = image_row_groups(packed.row_sample, max_rows, seed)

    @property
    def num_rows(self) -> int:
        return sum(map(len, self.groups))

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict:
        batch = self.packed.read_batch(self.groups[index])
        safe_id = batch["safe_id"][0]
        entry = self.cache.entry(safe_id)
        record = load_promptsets(self.project_root, self.packed.split, safe_id)
        points, labels, _, boxes = promptset_tensors(record)
        ids = {ps["promptset_id"]: i for i, ps in enumerate(record["promptsets"])}
        sets = torch.tensor([ids[int(p)] for p in batch["promptset_id"]], dtype=torch.int64)
        return {
            "inputs": batch["inputs"], "target": batch["target"],
            "features": {name: torch.as_tensor(value).float() for name, value in entry.features.items()},
            "point_coords": points[sets], "point_labels": labels[sets], "box": boxes[sets],
            "original_hw": torch.tensor(entry.original_hw),
        }


def collate_images(items: list[dict]) -> dict:
    """``FusionDataset`` items -> ``{"inputs": R x 3 x 256 x 256, "target": R x 1 x 256 x 256}`` (the
    rows of every item, in order) plus ``"images"``: per item its features, prompts, ``original_hw``
    and ``rows`` (its number of rows)."""
    images = [{key: value for key, value in item.items() if key not in ("inputs", "target")}
              | {"rows": int(item["inputs"].shape[0])} for item in items]
    return {"inputs": torch.cat([item["inputs"] for item in items]),
            "target": torch.cat([item["target"] for item in items]), "images": images}


def refinement_step(backbone, prompt_mode: str, multimask_policy: str, uncertainty_source: UncertaintySource,
                    loss_fn):
    """The ``step_fn`` of fusion training on ``collate_images`` batches: one refinement pass (one
    decoder call) per image for all its rows, the loss on the refined masks of every row."""
    def step_fn(model, batch):
        inputs = batch["inputs"]
        uncertainty = uncertainty_source(inputs)[:, None]
        logits, ious, start = [], [], 0
        for image in batch["images"]:
            rows = slice(start, start + image["rows"])
            start = rows.stop
            prompts = PROMPT_MODES[prompt_mode](image["point_coords"], image["point_labels"], image["box"])
            hw = tuple(int(v) for v in image["original_hw"])
            refined, iou = refine(backbone, model, image["features"], hw, prompts, inputs[rows, 0:1],
                                  uncertainty[rows], enable_grad=model.training, multimask_policy=multimask_policy)
            logits.append(refined)
            ious.append(iou)
        logits, ious = torch.cat(logits), torch.cat(ious)[:, 0]
        loss = loss_fn(logits, batch["target"], ious)
        return loss, (logits.detach(), batch["target"])

    return step_fn
