"""Scoring at ground-truth resolution: the streaming accumulators per (method, map, domain), the
per-mask rows, the per-image statistics behind the bootstrap intervals, and the resumable state
(``state.pt``) that holds them.

Domains: every group, ``overall``, and with ``data.unseen_groups`` the aggregates ``seen`` and
``unseen`` (``modules/data/domains.py``), each a domain of its own accumulators.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from modules.training.run_state import save_tensors
from modules.data.domains import domain_kind
from modules.sam.registry import verify_checkpoint_archive
from modules.evaluation.runs import EvaluationError
from modules.scoring import metrics
from modules.scoring.mask_quality import mask_scores
from modules.evaluation.samples import LabelledSample
from modules.uncertainty.strategies import EvalSample, StrategyOutput

log = logging.getLogger("pipeline")

STATE_FILE = "state.pt"
#: Version of the layout of ``state.pt``; a state of another version is refused (rerun with --force).
STATE_FORMAT = 3
#: The domain name of the rows that pool every domain.
OVERALL = "overall"
#: Lower end of the log-spaced bins of entropy-like maps (values below share the first bin).
LOG_BINNING_FLOOR = 1e-7
#: Map names of ``uncertainty.strategies`` -> the ``metrics.UNCERTAINTY_RANGES`` entry they follow.
MAP_RANGE_ALIASES = {"total_entropy": "entropy"}
#: Maps whose values crowd near 0 over several decades get log-spaced bins.
LOG_SCALE_MAPS = ("entropy", "expected_entropy", "mutual_information", "std", "variance")
SEGMENTATION_KEYS = ("iou", "dice", "boundary_iou_1pct", "boundary_iou_2pct", "precision", "recall", "mae",
                     "balanced_error_rate")
UNCERTAINTY_KEYS = ("auroc", "aupr", "ueo", "pearson", "spearman", "ause", "aurg", "error_rate")


def map_binning(map_name: str) -> tuple[tuple[float, float], bool]:
    """``(u_range, log_scale)`` of an uncertainty map, from ``metrics.UNCERTAINTY_RANGES``."""
    kind = MAP_RANGE_ALIASES.get(map_name, map_name)
    if kind not in metrics.UNCERTAINTY_RANGES:
        raise EvaluationError(f"{map_name}: no value range for this uncertainty map in metrics.UNCERTAINTY_RANGES")
    low, high = metrics.UNCERTAINTY_RANGES[kind]
    log_scale = kind in LOG_SCALE_MAPS
    return ((max(low, LOG_BINNING_FLOOR) if log_scale else low, high), log_scale)


def upsample(maps: torch.Tensor, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``P x 256 x 256`` FRAME256 maps -> ``P x H x W`` float32 on ``device`` (bilinear, align_corners=False)."""
    maps = maps.to(device=device, dtype=torch.float32).unsqueeze(1)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


@dataclass
class ScoredMethod:
    """One method's outputs at ground-truth resolution for one sample (``P x H x W`` each)."""

    prob: torch.Tensor
    maps: dict[str, torch.Tensor]
    primary_map: str


class ImageStatistics:
    """Per (image, method) sums of the method's primary map over the image's masks, from which the
    bootstrap over images recomputes the pixel metrics of any set of images: the error-detection
    histogram (``n_bins x 2`` int64, the accumulators' binning: column 1 counts error pixels) and the
    calibration bins (``count``, ``prob_sum``, ``positive_sum``, ``ece_bins`` each) and ``nll_sum``.
    Entries of different images add up, so shards merge by concatenation (``merge``)."""

    TENSORS = ("error_histogram", "count", "prob_sum", "positive_sum", "nll_sum")

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def add(self, safe_id: str, group: str, method: str, tensors: dict[str, torch.Tensor]) -> None:
        self.entries.append({"safe_id": safe_id, "group": group, "method": method,
                             **{name: tensors[name].detach().cpu() for name in self.TENSORS}})

    def merge(self, other: "ImageStatistics") -> None:
        """Add the entries of another shard (its images must not be here already)."""
        overlap = {e["safe_id"] for e in self.entries} & {e["safe_id"] for e in other.entries}
        if overlap:
            raise EvaluationError(f"image statistics: {sorted(overlap)[0]} is in both shards")
        self.entries.extend(other.entries)

    def stacked(self, method: str, groups: set[str] | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
        """Image ids and ``n x ...`` arrays of one method's entries (of ``groups`` only, when given)."""
        chosen = [e for e in self.entries if e["method"] == method and (groups is None or e["group"] in groups)]
        return ([e["safe_id"] for e in chosen],
                {name: np.stack([e[name].numpy() for e in chosen]) if chosen else np.zeros((0,))
                 for name in self.TENSORS})

    def state(self) -> list[dict[str, Any]]:
        return [{**{k: v for k, v in e.items() if k not in self.TENSORS},
                 **{name: _pack_tensor(e[name]) for name in self.TENSORS}} for e in self.entries]

    def load_state(self, state: list[dict[str, Any]]) -> None:
        self.entries = [{**{k: v for k, v in e.items() if k not in self.TENSORS},
                         **{name: _unpack_tensor(e[name], torch.device("cpu")) for name in self.TENSORS}}
                        for e in state]


def _primary_state(accumulator: metrics.UncertaintyAccumulator) -> dict[str, torch.Tensor]:
    """Copies of the sums ``ImageStatistics`` keeps (empty before the accumulator's first update)."""
    calibration = accumulator.calibration.state_dict()
    detection = accumulator.error_detection.state_dict()
    if not calibration:
        return {}
    return {"error_histogram": detection["_histogram"].clone(), "count": calibration["_count"].clone(),
            "prob_sum": calibration["_prob_sum"].clone(), "positive_sum": calibration["_positive_sum"].clone(),
            "nll_sum": calibration["_nll_sum"].clone()}


class Scoreboard:
    """Streaming accumulators per (method, map, domain), the per-mask rows of every method and the
    per-image statistics of their primary maps. ``unseen_groups``: the held-out groups (their samples
    also feed the ``unseen`` aggregate, the others ``seen``); ``mask_quality_band``: the boundary band
    of the per-mask quality scores (``modules/scoring/mask_quality.py``)."""

    def __init__(self, ece_bins: int, device: torch.device, unseen_groups: frozenset[str] = frozenset(),
                 mask_quality_band: float = 0.02) -> None:
        self.ece_bins = int(ece_bins)
        self.device = device
        self.unseen_groups = frozenset(unseen_groups)
        self.mask_quality_band = float(mask_quality_band)
        self.accumulators: dict[tuple[str, str, str], metrics.UncertaintyAccumulator] = {}
        self.primary_maps: dict[str, str] = {}
        self.rows: list[dict[str, Any]] = []
        self.done: list[str] = []
        self.images = ImageStatistics()

    def domains_of(self, group: str) -> tuple[str, ...]:
        """The domains a sample of ``group`` is scored in: its group, its seen / unseen aggregate (only
        when groups are held out) and ``overall``."""
        if not self.unseen_groups:
            return (group, OVERALL)
        return (group, domain_kind(group, self.unseen_groups), OVERALL)

    def accumulator(self, method: str, map_name: str, domain: str) -> metrics.UncertaintyAccumulator:
        key = (method, map_name, domain)
        if key not in self.accumulators:
            u_range, log_scale = map_binning(map_name)
            self.accumulators[key] = metrics.UncertaintyAccumulator(u_range, log_scale=log_scale,
                                                                    calibration_bins=self.ece_bins)
        return self.accumulators[key]

    def score_sample(self, labelled: LabelledSample, outputs: dict[str, StrategyOutput]) -> dict[str, ScoredMethod]:
        """Score every method's output of one sample against its ground truth; returns the upsampled outputs."""
        sample = labelled.inputs
        size = sample.original_hw
        gt = torch.from_numpy(labelled.ground_truth).to(self.device)
        gt_stack = gt.expand(sample.num_promptsets, *size)
        promptset_ids = [int(s["promptset_id"]) for s in sample.record["promptsets"]]
        sam_predicted_iou = sample.cache_entry.selected_iou_predictions
        scored = {}
        for method, output in outputs.items():
            prob = upsample(output.mean_prob, size, self.device).clamp_(0.0, 1.0)
            maps = {name: upsample(values, size, self.device) for name, values in output.maps.items()}
            self.primary_maps[method] = output.primary_map
            # Accumulators are created in update order (group, aggregate, overall), the order a merge
            # of shards restores (sort_in_unit_order).
            overall_key = (method, output.primary_map, OVERALL)
            before = _primary_state(self.accumulators[overall_key]) if overall_key in self.accumulators else {}
            for name, values in maps.items():
                for domain in self.domains_of(sample.group):
                    self.accumulator(method, name, domain).update(prob, gt_stack, values)
            after = _primary_state(self.accumulators[overall_key])
            self.images.add(sample.safe_id, sample.group, method,
                            {name: value - before[name] if before else value for name, value in after.items()})
            quality = mask_scores(prob, maps[output.primary_map], self.mask_quality_band)
            for index, promptset_id in enumerate(promptset_ids):
                row = self._mask_row(sample, method, promptset_id, prob[index], gt,
                                     {name: values[index] for name, values in maps.items()}, output.primary_map)
                row.update(quality[index], sam_predicted_iou=float(sam_predicted_iou[index]))
                self.rows.append(row)
            scored[method] = ScoredMethod(prob, maps, output.primary_map)
        self.done.append(sample.safe_id)
        return scored

    def _mask_row(self, sample: EvalSample, method: str, promptset_id: int, prob: torch.Tensor, gt: torch.Tensor,
                  maps: dict[str, torch.Tensor], primary_map: str) -> dict[str, Any]:
        calibration = metrics.calibration_metrics(prob, gt, n_bins=self.ece_bins)
        uncertainty = metrics.uncertainty_metrics(prob, gt, maps[primary_map])
        row = {"sample_id": sample.sample_id, "safe_id": sample.safe_id, "group": sample.group,
               "domain_kind": domain_kind(sample.group, self.unseen_groups), "promptset_id": promptset_id, "method": method, "primary_map": primary_map,
               **metrics.segmentation_metrics(prob, gt),
               "ece": calibration["ece"], "brier": calibration["brier"], "nll": calibration["nll"],
               "ece_bins": self.ece_bins}
        row.update({f"u_{key}": uncertainty[key] for key in UNCERTAINTY_KEYS})
        row["mean_uncertainty"] = uncertainty["mean_uncertainty"]
        row.update({f"mean_{name}": float(values.double().mean()) for name, values in maps.items()})
        return row

    # ----------------------------------------------------------- merging shards

    def merge(self, other: "Scoreboard") -> None:
        """Add another shard's scoreboard to this one: accumulators of the same (method, map, domain)
        are summed (``merge_accumulator_states``), rows and finished samples appended. Call
        ``sort_in_unit_order`` once every shard is merged. Per-sample state added to the scoreboard
        later must be merged here too (appended like ``rows``, reordered in ``sort_in_unit_order``)."""
        if other.ece_bins != self.ece_bins:
            raise EvaluationError(f"merging scoreboards of ece_bins {self.ece_bins} and {other.ece_bins}")
        if other.unseen_groups != self.unseen_groups:
            raise EvaluationError(f"merging scoreboards of unseen groups {sorted(self.unseen_groups)} and "
                                  f"{sorted(other.unseen_groups)}")
        overlap = set(self.done) & set(other.done)
        if overlap:
            raise EvaluationError(f"merging scoreboards that both scored {sorted(overlap)[:3]}: shards overlap")
        for key, accumulator in other.accumulators.items():
            mine = self.accumulator(*key)
            try:
                merged = merge_accumulator_states(accumulator_state(mine), accumulator_state(accumulator))
                restore_accumulator(mine, merged, self.device)
            except metrics.MetricInputError as exc:
                raise EvaluationError(f"merging {key}: {exc}") from None
        for method, map_name in other.primary_maps.items():
            if self.primary_maps.setdefault(method, map_name) != map_name:
                raise EvaluationError(f"merging scoreboards: {method} has primary map {self.primary_maps[method]} "
                                      f"in one shard and {map_name} in another")
        self.rows.extend(other.rows)
        self.done.extend(other.done)
        self.images.merge(other.images)

    def sort_in_unit_order(self, unit_order: Sequence[str]) -> None:
        """Put finished samples, rows and accumulators in the order a one-process run over the units
        ``unit_order`` (safe ids) makes them: samples in unit order, each sample's rows as scored, and
        accumulators by first appearance (the domain's first sample, then method, map, the domain
        before ``overall``), so the reports of merged shards equal a one-process run's."""
        position = {safe_id: index for index, safe_id in enumerate(unit_order)}
        missing = [safe_id for safe_id in self.done if safe_id not in position]
        if missing:
            raise EvaluationError(f"scored samples {missing[:3]} are not among the evaluation units")
        self.done.sort(key=position.__getitem__)
        self.rows.sort(key=lambda row: position[row["safe_id"]])  # stable: a sample's rows keep their order
        self.images.entries.sort(key=lambda entry: position[entry["safe_id"]])
        first_of_domain: dict[str, int] = {}
        method_order: dict[str, int] = {}
        map_order: dict[tuple[str, str], int] = {}
        for row in self.rows:
            for domain in self.domains_of(row["group"])[:-1]:  # the group and its seen / unseen aggregate
                first_of_domain.setdefault(domain, position[row["safe_id"]])
            method_order.setdefault(row["method"], len(method_order))
        if self.rows:  # ``overall`` appears with the first sample, right after that sample's own domain
            first_of_domain[OVERALL] = position[self.rows[0]["safe_id"]]
        for method, map_name, _ in self.accumulators:
            map_order.setdefault((method, map_name), len(map_order))

        aggregates = {domain_kind(group, self.unseen_groups) for group in {row["group"] for row in self.rows}} \
            if self.unseen_groups else set()

        def appearance(key: tuple[str, str, str]) -> tuple:
            method, map_name, domain = key
            domain_rank = 2 if domain == OVERALL else 1 if domain in aggregates else 0  # as domains_of orders them
            return (first_of_domain.get(domain, len(position)), method_order.get(method, len(method_order)),
                    map_order[(method, map_name)], domain_rank)

        self.accumulators = dict(sorted(self.accumulators.items(), key=lambda item: appearance(item[0])))
        self.primary_maps = dict(sorted(self.primary_maps.items(),
                                        key=lambda item: method_order.get(item[0], len(method_order))))

    # ----------------------------------------------------------- checkpoint

    def state(self) -> dict[str, Any]:
        """Everything needed to resume (tensors on the CPU; loadable with ``weights_only=True``)."""
        return {
            "format": STATE_FORMAT,
            "ece_bins": self.ece_bins,
            "unseen_groups": sorted(self.unseen_groups),
            "done": list(self.done),
            "rows": list(self.rows),
            "primary_maps": dict(self.primary_maps),
            "accumulators": [{"method": method, "map": map_name, "domain": domain,
                              "state": accumulator_state(accumulator)}
                             for (method, map_name, domain), accumulator in self.accumulators.items()],
            "images": self.images.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if (state.get("format") != STATE_FORMAT or state.get("ece_bins") != self.ece_bins
                or set(state.get("unseen_groups", ())) != self.unseen_groups):
            raise EvaluationError("state.pt: written by another version, with other ece_bins or other "
                                  "data.unseen_groups; rerun with --force")
        self.done = list(state["done"])
        self.images.load_state(state["images"])
        self.rows = list(state["rows"])
        self.primary_maps = dict(state["primary_maps"])
        for item in state["accumulators"]:
            accumulator = self.accumulator(item["method"], item["map"], item["domain"])
            try:
                restore_accumulator(accumulator, item["state"], self.device)
            except metrics.MetricInputError as exc:
                raise EvaluationError(f"state.pt: {exc}; rerun with --force") from None


#: Tensors larger than this are stored as (nonzero positions, values): the joint histograms are sparse.
_SPARSE_MIN_ELEMENTS = 4096


def _pack_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    tensor = tensor.detach().cpu()
    if tensor.numel() < _SPARSE_MIN_ELEMENTS:
        return {"dense": tensor.clone()}
    flat = tensor.reshape(-1)
    positions = torch.nonzero(flat, as_tuple=True)[0]
    return {"shape": list(tensor.shape), "positions": positions, "values": flat[positions].clone()}


def _unpack_tensor(packed: dict[str, Any], device: torch.device) -> torch.Tensor:
    if "dense" in packed:
        return packed["dense"].to(device)
    values = packed["values"]
    flat = torch.zeros(math.prod(packed["shape"]), dtype=values.dtype)
    flat[packed["positions"]] = values
    return flat.reshape(packed["shape"]).to(device)


def accumulator_state(accumulator: metrics.UncertaintyAccumulator) -> dict[str, dict[str, Any]]:
    """The accumulator's ``state_dict`` (``part -> tensor name -> tensor``) with every tensor packed."""
    return {part: {name: _pack_tensor(value) for name, value in tensors.items()}
            for part, tensors in accumulator.state_dict().items()}


def restore_accumulator(accumulator: metrics.UncertaintyAccumulator, state: dict[str, dict[str, Any]],
                        device: torch.device) -> None:
    """Load ``accumulator_state`` output, onto ``device``, into an accumulator of the same settings."""
    accumulator.load_state_dict({part: {name: _unpack_tensor(packed, device) for name, packed in tensors.items()}
                                 for part, tensors in state.items()})


#: The ``CorrelationAccumulator`` part: its moments are sums about ``_shift`` (the first update's
#: means), ``_moments`` = [n, sum du, sum de, sum du^2, sum de^2, sum du*de] for du = u - shift[0],
#: de = error - shift[1]. Every other tensor of an accumulator's state is a plain sum.
_SHIFT, _MOMENTS = "_shift", "_moments"


def _merge_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not first or not second:  # an accumulator part before any update holds nothing
        return {name: value.clone() for name, value in (first or second).items()}
    if set(first) != set(second):
        raise metrics.MetricInputError(f"states hold {sorted(first)} and {sorted(second)}")
    merged = {name: first[name] + second[name] for name in first if name not in (_SHIFT, _MOMENTS)}
    if _SHIFT in first:
        merged[_SHIFT] = first[_SHIFT].clone()
        merged[_MOMENTS] = first[_MOMENTS] + recentred_moments(second[_MOMENTS], second[_SHIFT] - first[_SHIFT])
    return merged


def recentred_moments(moments: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``_moments`` about a shift ``s`` -> about ``s - offset`` (``offset`` = ``[a_u, a_e]``: every
    du and de grow by ``a_u``, ``a_e``)."""
    n, su, se, suu, see, sue = moments.unbind()
    a_u, a_e = offset.to(moments.dtype).unbind()
    return torch.stack([n, su + n * a_u, se + n * a_e, suu + 2 * a_u * su + n * a_u * a_u,
                        see + 2 * a_e * se + n * a_e * a_e, sue + a_u * se + a_e * su + n * a_u * a_e])


def merge_accumulator_states(first: dict[str, dict[str, torch.Tensor]],
                             second: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """The ``accumulator_state`` of one accumulator fed the pixels of both (packed, like its inputs)."""
    if not first or not second:  # an accumulator before any update has no parts
        return first or second
    if set(first) != set(second):
        raise metrics.MetricInputError(f"accumulator parts {sorted(first)} and {sorted(second)} differ")
    return {part: {name: _pack_tensor(value) for name, value in
                   _merge_tensors({k: _unpack_tensor(v, torch.device("cpu")) for k, v in first[part].items()},
                                  {k: _unpack_tensor(v, torch.device("cpu")) for k, v in second[part].items()}).items()}
            for part in first}


def save_state(path: Path, scoreboard: Scoreboard) -> None:
    save_tensors(scoreboard.state(), path)


def load_state_file(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        verify_checkpoint_archive(path)  # torch.load would read flipped bytes as wrong sums
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn, damaged or foreign file: start over rather than crash
        log.warning("%s: unreadable evaluation state (%s); starting over", path, exc)
        return None
