"""Dense embedding fusion: uncertainty-guided refinement of SAM's mask in one extra decoder pass.

``UncertaintyFusion`` fuses the prompt encoder's dense embedding of the first-pass logits with an
embedded uncertainty map; the result replaces the dense prompt embedding in one more pass of the
frozen mask decoder (``refine``). Only the fusion module trains, on cached image embeddings. Its
fuse conv starts as the identity on the mask embedding, so an untrained module reproduces SAM's
plain mask-prompt refinement. Uncertainty sources (``UNCERTAINTY_SOURCES``) map head inputs to
``B x 256 x 256`` maps in [0, 1] (FRAME256).

A refined mask replaces SAM's first pass only through the gate (``gate_by_predicted_iou``: the
decoder's own predicted IoUs, no ground truth). After training, ``validate_refinement_switch``
scores raw SAM against the gated refinement on the validation split and picks the gate's margin, or
switches the refinement off (``RefinementSwitch``, ``SWITCH_FILE`` beside the checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from modules.core.errors import PipelineError
from modules.core.fileio import atomic_write_json, file_md5, read_json
from modules.data.promptset import load_promptsets, promptset_tensors
from modules.sam.prompting import PROMPT_MODES, Prompts, decode_selected
from modules.scoring.entropy import binary_entropy_from_logits
from modules.training.losses import hard_iou
from modules.training.models import UncertaintyFusion, VarianceNetwork
from modules.uncertainty.strategies import read_variance, variance_readout

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
                            predictive: str = "mc", variance_loss: str = "gaussian_residual_nll") -> UncertaintySource:
    """A function ``head_inputs B x 3 x 256 x 256 -> uncertainty B x 256 x 256 in [0, 1]``
    (``predictive``: ``laplace.predictive`` for ``laplace_epistemic``; ``variance_loss``: the
    ``variance.loss`` the variance network was trained with, whose primary map it reads:
    ``strategies.VARIANCE_READOUTS``)."""
    variance = variance_readout(variance_loss)

    def raw_sam_entropy(x):
        return binary_entropy_from_logits(x[:, 0]) / LN2

    def map_entropy(x):
        return binary_entropy_from_logits(head(x)[:, 0]) / LN2

    def laplace_epistemic(x):
        return posterior.maps(x, predictive, num_samples, seed=seed)["mutual_information"].clamp(0, LN2) / LN2

    def variance_network_map(x):
        logits = head(x)
        log_var = variance_network(VarianceNetwork.build_inputs(x, logits))[:, 0]
        if variance.primary_map == "entropy":
            return read_variance(variance, logits[:, 0].float(), log_var.float())[1]["entropy"] / LN2
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


    def row_groups_and_sam_iou(self, index: int) -> tuple[list[str], str, torch.Tensor]:
        """Item ``index``'s rows: their data-set group (R str), the image's ``safe_id`` and SAM's
        predicted IoU ``R`` of the cached first pass (the decoder's estimate, no ground truth)."""
        rows = self.groups[index]
        groups = [str(group) for group in self.packed.index["group"].iloc[rows]]
        safe_id = self.packed.sample_safe_ids[self.packed.row_sample[rows[0]]]
        entry = self.cache.entry(safe_id)
        position = {int(pid): i for i, pid in enumerate(np.asarray(entry.promptset_ids))}
        selected = entry.selected_iou_predictions
        return groups, safe_id, torch.tensor([float(selected[position[int(self.packed.promptset_ids[row])]])
                                              for row in rows])


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


# --------------------------------------------------------------------------- gate and validated switch


#: The validated switch ``train_head.py --model fusion`` writes beside the fusion checkpoint.
SWITCH_FILE = "refinement_switch.json"
#: The switch's seeded bootstrap over validation images: a gain must hold at the lower end of its
#: 95% interval, not only on average (the validation split of the demo holds a few images per group).
SWITCH_BOOTSTRAP_SAMPLES = 1000
SWITCH_BOOTSTRAP_SEED = 0
#: How ``choose_refinement_switch`` decides (recorded in the switch; a changed rule recomputes it).
SWITCH_RULE = {
    "rule": "refined mask kept where its predicted IoU beats SAM's first pass's by more than margin; margin chosen "
            "on validation so that no group's mean IoU falls below raw SAM's and the overall gain's bootstrap 95% "
            "interval over images lies above 0; none qualifies: refinement off (SAM's first pass)",
    "bootstrap": {"samples": SWITCH_BOOTSTRAP_SAMPLES, "seed": SWITCH_BOOTSTRAP_SEED, "over": "images"},
}


def gate_by_predicted_iou(refined_logits: torch.Tensor, refined_iou: torch.Tensor, first_pass_logits: torch.Tensor,
                          first_pass_iou: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per prompt set, the refined logits ``P x H x W`` where their predicted IoU ``P`` beats the first
    pass's by more than ``margin``, else the first pass's logits ``P x H x W`` (a tie keeps the first
    pass; ``margin = inf`` keeps every first pass)."""
    keep_refined = (refined_iou > first_pass_iou + margin)[:, None, None]
    return torch.where(keep_refined, refined_logits, first_pass_logits)


@dataclass(frozen=True)
class RefinementSwitch:
    """What ``fusion.gate: validated`` applies: the predicted-IoU gate with ``margin`` when ``enabled``,
    else no refinement at all (SAM's first pass, exactly). One switch for every image: the group of a
    user's image is unknown at inference, so no per-group switch is applied."""

    enabled: bool
    margin: float

    @property
    def gate_margin(self) -> float:
        return self.margin if self.enabled else math.inf

    @classmethod
    def load(cls, folder: Path) -> "RefinementSwitch":
        """The switch recorded in ``folder`` (a fusion run); a missing or damaged file is one line."""
        path = Path(folder) / SWITCH_FILE
        try:
            record = read_json(path)
            return cls(bool(record["enabled"]), float(record["margin"]) if record["enabled"] else math.inf)
        except FileNotFoundError:
            raise PipelineError(f"{path}: no validated refinement switch (fusion.gate: validated); rerun "
                                "train_head.py --model fusion with --resume for this run to write it") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PipelineError(f"{path}: unreadable refinement switch ({type(error).__name__}); rerun "
                                "train_head.py --model fusion with --resume for this run to rewrite it") from None


@dataclass(frozen=True)
class ValidationScores:
    """Per validation row (R): its ``groups`` and ``images`` (safe ids), the FRAME256 IoU of SAM's first
    pass (``sam_iou``) and of the ungated refined mask (``refined_iou``), and both masks' predicted
    IoUs (the gate's inputs)."""

    groups: np.ndarray
    images: np.ndarray
    sam_iou: np.ndarray
    refined_iou: np.ndarray
    sam_predicted_iou: np.ndarray
    refined_predicted_iou: np.ndarray

    def gated_iou(self, margin: float) -> np.ndarray:
        """``R``: each row's IoU after the gate with ``margin``."""
        keep_refined = self.refined_predicted_iou > self.sam_predicted_iou + margin
        return np.where(keep_refined, self.refined_iou, self.sam_iou)

    def means(self, iou: np.ndarray) -> dict[str, float]:
        """Mean of ``iou`` (R) per group and ``overall`` (over rows)."""
        means = {str(group): float(iou[self.groups == group].mean()) for group in np.unique(self.groups)}
        return means | {"overall": float(iou.mean())}

    def gain_interval(self, iou: np.ndarray, samples: int = SWITCH_BOOTSTRAP_SAMPLES,
                      seed: int = SWITCH_BOOTSTRAP_SEED) -> tuple[float, float]:
        """95% interval of the mean gain ``iou - sam_iou`` (R) over rows, images resampled (seeded)."""
        images, row_image = np.unique(self.images, return_inverse=True)
        gain_sum = np.bincount(row_image, weights=iou - self.sam_iou, minlength=len(images))
        row_count = np.bincount(row_image, minlength=len(images)).astype(np.float64)
        draws = np.random.default_rng(seed).integers(0, len(images), (samples, len(images)))
        means = gain_sum[draws].sum(axis=1) / row_count[draws].sum(axis=1)
        low, high = np.quantile(means, [0.025, 0.975])
        return float(low), float(high)


def score_validation(backbone, fusion: UncertaintyFusion, dataset: FusionDataset, prompt_mode: str,
                     multimask_policy: str, uncertainty_source: UncertaintySource) -> ValidationScores:
    """Raw SAM and the ungated refinement on every row of ``dataset`` (one decoder call per image);
    the ground truth only scores the masks."""
    device = backbone.device
    fusion = fusion.to(device).eval()
    groups, images, sam_iou, refined_iou, sam_predicted, refined_predicted = [], [], [], [], [], []
    with torch.inference_mode():
        for index in range(len(dataset)):
            item = dataset[index]
            row_groups, safe_id, sam_predicted_iou = dataset.row_groups_and_sam_iou(index)
            first_pass = item["inputs"][:, 0:1].to(device)
            uncertainty = uncertainty_source(item["inputs"].to(device))[:, None]
            prompts = PROMPT_MODES[prompt_mode](item["point_coords"].to(device), item["point_labels"].to(device),
                                                item["box"].to(device))
            features = {name: value.to(device) for name, value in item["features"].items()}
            hw = tuple(int(v) for v in item["original_hw"])
            logits, predicted = refine(backbone, fusion, features, hw, prompts, first_pass, uncertainty,
                                       multimask_policy=multimask_policy)
            target = item["target"].to(device)
            groups += row_groups
            images += [safe_id] * len(row_groups)
            sam_iou.append(hard_iou(first_pass, target).cpu())
            refined_iou.append(hard_iou(logits.float(), target).cpu())
            sam_predicted.append(sam_predicted_iou)
            refined_predicted.append(predicted[:, 0].float().cpu())
    return ValidationScores(np.array(groups), np.array(images), *(torch.cat(values).double().numpy() for values in
                                                (sam_iou, refined_iou, sam_predicted, refined_predicted)))


def choose_refinement_switch(scores: ValidationScores) -> dict:
    """The gate's margin chosen on validation, as the json record ``SWITCH_FILE`` holds.

    Candidate margins: 0 (the plain predicted-IoU gate) and every row's positive predicted-IoU gain
    (refined minus SAM's). A margin qualifies when no group's mean IoU falls below raw SAM's and the
    overall gain over raw SAM holds at the lower end of its bootstrap interval over images
    (``ValidationScores.gain_interval`` > 0); the best overall mean wins (ties: the larger, stricter
    margin). No qualifying margin switches the refinement off.
    """
    gain = scores.refined_predicted_iou - scores.sam_predicted_iou
    raw = scores.means(scores.sam_iou)
    candidates = []
    for margin in sorted({0.0, *gain[gain > 0].tolist()}):
        gated_iou = scores.gated_iou(margin)
        gated = scores.means(gated_iou)
        low, high = scores.gain_interval(gated_iou)
        qualifies = low > 0 and all(gated[g] >= raw[g] for g in raw)
        candidates.append({"margin": margin, "qualifies": qualifies, "mean_iou": gated,
                           "gain_interval": [low, high], "refined_rows": int((gain > margin).sum())})
    qualifying = [c for c in candidates if c["qualifies"]]
    chosen = max(qualifying, key=lambda c: (c["mean_iou"]["overall"], c["margin"])) if qualifying else None
    return {
        "enabled": chosen is not None,
        "margin": None if chosen is None else chosen["margin"],
        "rows": int(len(scores.groups)),
        "rows_per_group": {str(g): int((scores.groups == g).sum()) for g in np.unique(scores.groups)},
        "mean_iou": {"raw_sam": raw, "refined_ungated": scores.means(scores.refined_iou),
                     "refined_gate_margin_0": candidates[0]["mean_iou"],
                     "refined_chosen": raw if chosen is None else chosen["mean_iou"]},
        "candidates": candidates,
    }


def validate_refinement_switch(folder: Path, checkpoint: Path, score: Callable[[], ValidationScores],
                               provenance: dict) -> dict:
    """Write the validated switch of the fusion run in ``folder`` (``SWITCH_FILE``, atomically) unless
    it is already there for this ``checkpoint`` (its md5) and ``provenance``; returns the record.
    ``score`` runs the validation (``score_validation``) only when needed."""
    path = Path(folder) / SWITCH_FILE
    stamp = {"checkpoint_md5": file_md5(checkpoint), **SWITCH_RULE, **provenance}
    if path.is_file():
        try:
            record = read_json(path)
        except (OSError, ValueError):
            record = {}
        if isinstance(record, dict) and all(record.get(key) == value for key, value in stamp.items()):
            return record
    record = {**choose_refinement_switch(score()), **stamp}
    atomic_write_json(path, record)
    return record
