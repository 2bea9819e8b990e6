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


class FusionDataset(torch.utils.data.Dataset):
    """Packed rows joined with what a refinement pass needs: cached features and the prompt set.

    Item: the packed row (``inputs 3 x 256 x 256``: clipped SAM logits = the first pass, prompt
    maps; ``target 1 x 256 x 256``) plus ``features`` (dict of ``C x h x w`` float32 from the SAM
    cache), ``point_coords N x 2``, ``point_labels N`` (canonical padding), ``box 4`` (original
    pixels) and ``original_hw (2,)``.
    """

    def __init__(self, packed, cache, project_root):
        self.packed = packed
        self.cache = cache
        self.project_root = project_root
        self._prompts: dict[str, tuple] = {}

    def __len__(self) -> int:
        return len(self.packed)

    def _prompt_tensors(self, safe_id: str):
        if safe_id not in self._prompts:
            record = load_promptsets(self.project_root, self.packed.split, safe_id)
            points, labels, _, boxes = promptset_tensors(record)
            ids = {ps["promptset_id"]: i for i, ps in enumerate(record["promptsets"])}
            self._prompts[safe_id] = (points, labels, boxes, ids)
        return self._prompts[safe_id]

    def __getitem__(self, index: int) -> dict:
        item = dict(self.packed[index])
        entry = self.cache.entry(item["safe_id"])
        points, labels, boxes, ids = self._prompt_tensors(item["safe_id"])
        row = ids[item["promptset_id"]]
        item.update(
            features={name: torch.from_numpy(value).float() for name, value in entry.features.items()},
            point_coords=points[row], point_labels=labels[row], box=boxes[row],
            original_hw=torch.tensor(entry.original_hw),
        )
        return item


def refinement_step(backbone, prompt_mode: str, multimask_policy: str, uncertainty_source: UncertaintySource,
                    loss_fn):
    """The ``step_fn`` of fusion training: one refinement pass per row, loss on the refined mask."""
    def step_fn(model, batch):
        inputs = batch["inputs"]
        uncertainty = uncertainty_source(inputs)[:, None]
        logits, ious = [], []
        for b in range(inputs.shape[0]):
            prompts = PROMPT_MODES[prompt_mode](batch["point_coords"][b:b + 1], batch["point_labels"][b:b + 1],
                                                batch["box"][b:b + 1])
            features = {name: value[b:b + 1] for name, value in batch["features"].items()}
            hw = tuple(int(v) for v in batch["original_hw"][b])
            refined, iou = refine(backbone, model, features, hw, prompts, inputs[b:b + 1, 0:1], uncertainty[b:b + 1],
                                  enable_grad=model.training, multimask_policy=multimask_policy)
            logits.append(refined)
            ious.append(iou)
        logits, ious = torch.cat(logits), torch.cat(ious)[:, 0]
        loss = loss_fn(logits, batch["target"], ious)
        return loss, (logits.detach(), batch["target"])

    return step_fn
