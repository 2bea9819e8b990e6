"""Prompts for a frozen SAM backbone, and the one decode-and-select step every stage shares.

``Prompts`` is the prompt container of the whole project; ``PROMPT_MODES`` (``sam.prompt_mode``)
picks which prompts of a prompt set go into the decoder and ``MULTIMASK_POLICIES``
(``sam.multimask_policy``) which of its outputs is kept. ``decode_selected`` runs both for all
prompt sets of one image; stage 3, TTA, the decoder Laplace and the fusion refinement call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

if TYPE_CHECKING:
    from modules.sam.base import DecoderFeatures


@dataclass(frozen=True)
class Prompts:
    """The prompts of ``P`` prompt sets of one image (None = not given).

    - ``point_coords``: ``P x N x 2`` (x, y) ORIGINAL pixels; ``point_labels``: ``P x N``
      (1 positive, 0 negative, -1 padding).
    - ``boxes``: ``P x 4`` (x0, y0, x1, y1) ORIGINAL pixels.
    - ``mask_input``: ``P x 1 x 256 x 256`` logits in FRAME256.
    - ``dense_embedding_override``: ``P x 256 x 64 x 64``, replaces the prompt encoder's dense
      embedding.
    """

    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    mask_input: torch.Tensor | None = None
    dense_embedding_override: torch.Tensor | None = None

    @property
    def num_sets(self) -> int:
        """``P``: the leading size of the first prompt given (1 when none is)."""
        for value in (self.point_coords, self.boxes, self.mask_input, self.dense_embedding_override):
            if value is not None:
                return int(value.shape[0])
        return 1


#: sam.prompt_mode -> which prompts of a prompt set go into the decoder.
PROMPT_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Prompts]] = {
    "points": lambda points, labels, boxes: Prompts(points, labels, None),
    "box": lambda points, labels, boxes: Prompts(None, None, boxes),
    "points_and_box": lambda points, labels, boxes: Prompts(points, labels, boxes),
}


@dataclass(frozen=True)
class MultimaskPolicy:
    """How one logit map per prompt set is chosen from the decoder's outputs."""

    multimask_output: bool
    num_outputs: int

    def select(self, logits: torch.Tensor, iou_predictions: torch.Tensor,
               branch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``P x M x 256 x 256`` logits, ``P x M`` IoUs -> ``P x 256 x 256`` logits, ``P`` indices.

        ``branch``: the ``P`` output indices to take; default the highest predicted IoU.
        """
        if branch is None:
            branch = iou_predictions.argmax(dim=1)
        chosen = logits[torch.arange(logits.shape[0], device=logits.device), branch]
        return chosen, branch


#: sam.multimask_policy -> policy. ``single``: the single-mask output (M = 1, index 0);
#: ``best_iou``: the multimask output (M = 3) with the highest predicted IoU.
MULTIMASK_POLICIES: dict[str, MultimaskPolicy] = {
    "single": MultimaskPolicy(multimask_output=False, num_outputs=1),
    "best_iou": MultimaskPolicy(multimask_output=True, num_outputs=3),
}


def round_features(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16-rounded copies of encoder features, as the SAM cache stores them. Decoding from them
    gives exactly the logits stage 3 stored (the decoder casts them back to float32)."""
    return {name: value.to(torch.float16) for name, value in features.items()}


@dataclass
class SelectedOutputs:
    """The output kept per prompt set of one ``decode_selected`` call.

    - ``logits``: ``P x 256 x 256`` float32 FRAME256 of the kept output.
    - ``branch``: ``P`` int64, the index of the kept output among the ``M`` decoded.
    - ``iou_predictions``: ``P x M`` predicted IoUs of all outputs.
    - ``unrolled``: the ``decode_features`` result (all ``M`` outputs) when asked for, else None.
    """

    logits: torch.Tensor
    branch: torch.Tensor
    iou_predictions: torch.Tensor
    unrolled: DecoderFeatures | None = None


def decode_selected(
    backbone,
    features: Mapping[str, torch.Tensor],
    original_hw: tuple[int, int],
    prompts: Prompts,
    prompt_mode: str | None,
    multimask_policy: str,
    *,
    unrolled: bool = False,
    choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    **decode_options: Any,
) -> SelectedOutputs:
    """One decoder call for the ``P`` prompt sets of one image, one output kept per prompt set.

    Args:
        backbone: a ``modules.sam.base.Backbone`` (or anything with its ``decode``).
        features: ``Backbone.encode`` output for this image (``C x h x w`` or ``1 x C x h x w``).
        original_hw: ``(H, W)`` of the ORIGINAL image.
        prompts: ``point_coords`` / ``point_labels`` / ``boxes`` of the prompt sets.
        prompt_mode: a ``PROMPT_MODES`` key choosing which of ``prompts`` go in; None: all given.
        multimask_policy: a ``MULTIMASK_POLICIES`` key: the decoder's outputs and the one kept.
        unrolled: decode with ``backbone.decode_features`` (kept in ``SelectedOutputs.unrolled``).
        choose: ``(P x M x 256 x 256 logits, P x M IoUs) -> P`` output indices to keep instead of
            the policy's choice (e.g. the indices stage 3 cached).
        decode_options: passed on to ``decode`` (``dense_embedding_override``, ``enable_grad``).
    """
    policy = MULTIMASK_POLICIES[multimask_policy]
    if prompt_mode is not None:
        prompts = PROMPT_MODES[prompt_mode](prompts.point_coords, prompts.point_labels, prompts.boxes)
    arguments = dict(point_coords=prompts.point_coords, point_labels=prompts.point_labels, boxes=prompts.boxes,
                     mask_input=None, multimask_output=policy.multimask_output, **decode_options)
    decoded = None
    if unrolled:
        decoded = backbone.decode_features(dict(features), original_hw, **arguments)
        logits, iou_predictions = decoded.logits, decoded.iou_predictions
    else:
        logits, iou_predictions = backbone.decode(features, original_hw, **arguments)
    branch = None if choose is None else choose(logits, iou_predictions)
    chosen, branch = policy.select(logits, iou_predictions, branch)
    return SelectedOutputs(chosen, branch, iou_predictions, decoded)
