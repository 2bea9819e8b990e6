"""The one step from encoder features and prompt sets to a ``CacheEntry`` (or a batch of them).

Stage 3 caches what this returns; the interactive predictor and the click simulation build the
same entry in memory for prompts that were never cached, so every later step (head inputs, the
Laplace, the variance network, the refinement) reads one kind of input, rounded as the cache
rounds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from modules.cache.sam_cache import CacheEntry
from modules.data.promptset import promptset_tensors
from modules.sam.prompting import Prompts, decode_selected

#: ``(shape, numpy dtype) -> array`` to copy a host result into.
HostArray = Callable[[tuple, np.dtype], np.ndarray]


def record_prompts(record: dict) -> tuple[Prompts, np.ndarray]:
    """The ``Prompts`` of a prompt-set record (points ``P x N x 2``, labels ``P x N``, boxes ``P x 4``,
    ORIGINAL pixels, padded to the record's ``point_width``) and its ``P`` prompt-set ids (int32)."""
    points, labels, _, boxes = promptset_tensors(record)
    ids = np.array([s["promptset_id"] for s in record["promptsets"]], dtype=np.int32)
    return Prompts(points, labels, boxes), ids


@dataclass(frozen=True)
class EntryRequest:
    """One image's part of ``decoded_entries``: its prompt sets and what its ``CacheEntry`` records.

    - ``prompts``: ``Prompts`` in ORIGINAL pixels; ``promptset_ids``: ``P``.
    - ``mask_input``: ``P x 1 x 256 x 256`` low-res logits in FRAME256 (an earlier prediction's),
      decoded with the prompts: the prompt encoder's dense embedding of that mask
      (``Backbone.mask_embedding``) replaces its no-mask embedding, as SAM does with a mask prompt.
      Stage 3 never caches one; None: no mask prompt.
    """

    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    prompts: Prompts
    promptset_ids: np.ndarray
    safe_id: str
    split: str
    promptset_md5: str = ""
    mask_input: torch.Tensor | None = None


def host_copy(tensor: torch.Tensor, host_array: HostArray | None = None) -> np.ndarray:
    """``tensor`` on the host as numpy: one device-to-host copy, into ``host_array(shape, dtype)``'s
    array when given (stage 3's writer process hands out shared memory there)."""
    if host_array is None:
        return tensor.cpu().numpy()
    out = host_array(tuple(tensor.shape), np.dtype(str(tensor.dtype).removeprefix("torch.")))
    torch.from_numpy(out).copy_(tensor)
    return out


def decoded_entries(backbone, features: Mapping[str, torch.Tensor], requests: Sequence[EntryRequest],
                    prompt_mode: str, multimask_policy: str, host_array: HostArray | None = None) -> list[CacheEntry]:
    """Decode the prompt sets of a batch of ``B`` images (one decoder call per image) and keep what
    stage 3 caches, with one device-to-host copy per kind of output for the whole batch.

    Args:
        features: float16-rounded encoder features (``sam.prompting.round_features``),
            name -> ``B x C x h x w`` on the backbone's device, image ``i`` for ``requests[i]``.
        host_array: where the host copies go (``host_copy``); None: new arrays.
    Returns:
        one ``CacheEntry`` per request (features ``C x h x w`` float16, logits ``P x 256 x 256``
        float16 FRAME256), the same bytes as decoding and copying each image on its own.
    """
    if not requests:
        return []
    selected = []
    for index, request in enumerate(requests):
        mask_prompt = {} if request.mask_input is None else {
            "dense_embedding_override": backbone.mask_embedding(request.mask_input, request.original_hw)}
        single = {name: value[index:index + 1] for name, value in features.items()}
        selected.append(decode_selected(backbone, single, request.original_hw, request.prompts, prompt_mode,
                                        multimask_policy, **mask_prompt))
    host_features = {name: host_copy(value[:len(requests)], host_array) for name, value in features.items()}
    logits = host_copy(torch.cat([part.logits for part in selected]).to(torch.float16), host_array)
    branch = host_copy(torch.cat([part.branch for part in selected]).to(torch.int8), host_array)
    iou_predictions = host_copy(torch.cat([part.iou_predictions for part in selected]).float(), host_array)
    ends = np.cumsum([len(part.branch) for part in selected])
    entries = []
    for index, (request, end) in enumerate(zip(requests, ends)):
        rows = slice(end - len(selected[index].branch), end)
        entries.append(CacheEntry(
            safe_id=request.safe_id,
            split=request.split,
            features={name: value[index] for name, value in host_features.items()},
            logits=logits[rows],
            promptset_ids=np.asarray(request.promptset_ids, dtype=np.int32),
            branch_index=branch[rows],
            iou_predictions=iou_predictions[rows],
            original_hw=(int(request.original_hw[0]), int(request.original_hw[1])),
            input_hw=(int(request.input_hw[0]), int(request.input_hw[1])),
            promptset_md5=request.promptset_md5,
        ))
    return entries


def decoded_entry(backbone, features: Mapping[str, torch.Tensor], original_hw: tuple[int, int],
                  input_hw: tuple[int, int], prompts: Prompts, promptset_ids: np.ndarray, prompt_mode: str,
                  multimask_policy: str, safe_id: str, split: str, promptset_md5: str = "",
                  mask_input: torch.Tensor | None = None) -> CacheEntry:
    """``decoded_entries`` for one image: ``features`` name -> ``1 x C x h x w`` (see ``EntryRequest``
    for the rest)."""
    request = EntryRequest(original_hw, input_hw, prompts, promptset_ids, safe_id, split, promptset_md5, mask_input)
    return decoded_entries(backbone, features, [request], prompt_mode, multimask_policy)[0]
