"""The one step from encoder features and prompt sets to a ``CacheEntry``.

Stage 3 caches what this returns; the interactive predictor and the click simulation build the
same entry in memory for prompts that were never cached, so every later step (head inputs, the
Laplace, the variance network, the refinement) reads one kind of input, rounded as the cache
rounds it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from modules.cache.sam_cache import CacheEntry
from modules.data.promptset import promptset_tensors
from modules.sam.prompting import Prompts, decode_selected


def record_prompts(record: dict) -> tuple[Prompts, np.ndarray]:
    """The ``Prompts`` of a prompt-set record (points ``P x N x 2``, labels ``P x N``, boxes ``P x 4``,
    ORIGINAL pixels, padded to the record's ``point_width``) and its ``P`` prompt-set ids (int32)."""
    points, labels, _, boxes = promptset_tensors(record)
    ids = np.array([s["promptset_id"] for s in record["promptsets"]], dtype=np.int32)
    return Prompts(points, labels, boxes), ids


def decoded_entry(backbone, features: Mapping[str, torch.Tensor], original_hw: tuple[int, int],
                  input_hw: tuple[int, int], prompts: Prompts, promptset_ids: np.ndarray, prompt_mode: str,
                  multimask_policy: str, safe_id: str, split: str, promptset_md5: str = "",
                  mask_input: torch.Tensor | None = None) -> CacheEntry:
    """Decode the ``P`` prompt sets of one image in one call and keep what stage 3 caches.

    Args:
        features: float16-rounded encoder features (``sam.prompting.round_features``),
            name -> ``1 x C x h x w`` on the backbone's device.
        prompts: ``Prompts`` in ORIGINAL pixels; ``promptset_ids``: ``P``.
        mask_input: ``P x 1 x 256 x 256`` low-res logits in FRAME256 (an earlier prediction's), decoded
            with the prompts: the prompt encoder's dense embedding of that mask
            (``Backbone.mask_embedding``) replaces its no-mask embedding, as SAM does with a mask
            prompt. Stage 3 never caches one; None: no mask prompt.
    Returns:
        the ``CacheEntry`` (features ``C x h x w`` float16, logits ``P x 256 x 256`` float16 FRAME256).
    """
    mask_prompt = {} if mask_input is None else {
        "dense_embedding_override": backbone.mask_embedding(mask_input, original_hw)}
    selected = decode_selected(backbone, features, original_hw, prompts, prompt_mode, multimask_policy,
                               **mask_prompt)
    return CacheEntry(
        safe_id=safe_id,
        split=split,
        features={name: value[0].cpu().numpy() for name, value in features.items()},
        logits=selected.logits.to(torch.float16).cpu().numpy(),
        promptset_ids=np.asarray(promptset_ids, dtype=np.int32),
        branch_index=selected.branch.to(torch.int8).cpu().numpy(),
        iou_predictions=selected.iou_predictions.float().cpu().numpy(),
        original_hw=(int(original_hw[0]), int(original_hw[1])),
        input_hw=(int(input_hw[0]), int(input_hw[1])),
        promptset_md5=promptset_md5,
    )
