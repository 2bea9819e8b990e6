"""Bootstrap intervals of the report's figures, and the mask-quality table, per domain and for the
``seen`` / ``unseen`` / ``overall`` aggregates.

Every interval resamples the images of its domain (``evaluation.bootstrap_samples`` replicates,
seeded by ``evaluation.bootstrap_seed``; the same replicates for every figure of a domain): the
mean IoU and the mask-level figures from the per-mask rows (each mask weighted by how often its
image was drawn), AUROC, ECE and NLL of a method's primary map from the per-image sums in
``Scoreboard.images``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from modules.core.config import PipelineConfig
from modules.data.domains import SEEN, UNSEEN
from modules.evaluation.scoreboard import OVERALL, Scoreboard
from modules.scoring.bootstrap import (Interval, auroc_from_histograms, ece_from_bins, percentile_interval,
                                       ratio_interval, resample_counts, summed)
from modules.scoring.mask_quality import (BAD_MASK_IOU, QUALITY_SCORES, quality_metrics, quality_values,
                                         weighted_spearman)

#: Columns of the summary tables that get ``<column>_lo`` / ``<column>_hi`` (AUROC, ECE and NLL only
#: on primary-map rows: the per-image sums are kept for the primary map).
INTERVAL_COLUMNS = ("mean_iou", "auroc", "ece", "nll", "mask_spearman")
#: The aggregate domains, in report order (``seen`` / ``unseen`` only when groups are held out).
AGGREGATES = (SEEN, UNSEEN, OVERALL)
MASK_QUALITY_METRICS = ("spearman", "auroc_bad", "aurc")


@dataclass(frozen=True)
class BootstrapSettings:
    samples: int = 1000
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "BootstrapSettings":
        return cls(cfg.evaluation.bootstrap_samples, cfg.evaluation.bootstrap_seed)


def domain_kind_of(domain: str, unseen_groups: frozenset[str]) -> str:
    """``seen`` / ``unseen`` for a group or an aggregate of them, ``all`` for ``overall``."""
    if domain == OVERALL:
        return "all"
    if domain in (SEEN, UNSEEN):
        return domain
    return UNSEEN if domain in unseen_groups else SEEN


def domain_rows(masks: pd.DataFrame, domain: str, unseen_groups: frozenset[str]) -> pd.DataFrame:
    """The per-mask rows of a domain (a group or an aggregate)."""
    if domain == OVERALL:
        return masks
    if domain == SEEN:
        return masks[~masks["group"].isin(unseen_groups)]
    if domain == UNSEEN:
        return masks[masks["group"].isin(unseen_groups)]
    return masks[masks["group"] == domain]


def domains_in_order(groups: list[str], unseen_groups: frozenset[str]) -> list[str]:
    """Seen groups, unseen groups (each sorted), then the aggregates present."""
    ordered = sorted(g for g in groups if g not in unseen_groups) + sorted(g for g in groups if g in unseen_groups)
    aggregates = AGGREGATES if unseen_groups else (OVERALL,)
    return ordered + list(aggregates)


class DomainResampler:
    """The replicates of each domain's images (cached: every figure of a domain uses the same ones)."""

    def __init__(self, settings: BootstrapSettings) -> None:
        self.settings = settings
        self._counts: dict[int, np.ndarray] = {}

    def counts(self, n_images: int) -> np.ndarray:
        if n_images not in self._counts:
            self._counts[n_images] = resample_counts(n_images, self.settings.samples, self.settings.seed)
        return self._counts[n_images]


def _mask_weights(rows: pd.DataFrame, counts: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``B x n_masks`` weights (the count of each mask's image) and the image ids in count order."""
    codes, images = pd.factorize(rows["safe_id"])
    return counts[:, codes].astype(np.float64), list(images)


def _put(entry: dict[str, Any], name: str, interval: Interval) -> None:
    entry[f"{name}_lo"], entry[f"{name}_hi"] = interval.lo, interval.hi


def summary_intervals(scoreboard: Scoreboard, rows: pd.DataFrame, method: str, map_name: str, is_primary: bool,
                      resampler: DomainResampler) -> dict[str, Any]:
    """``n_images`` and ``<column>_lo`` / ``_hi`` of ``INTERVAL_COLUMNS`` for one summary row: ``rows``
    are the domain's per-mask rows of ``method``."""
    entry: dict[str, Any] = {"n_images": int(rows["safe_id"].nunique())}
    for column in INTERVAL_COLUMNS:
        entry[f"{column}_lo"] = entry[f"{column}_hi"] = float("nan")
    if rows.empty:
        return entry
    counts = resampler.counts(entry["n_images"])
    weights, images = _mask_weights(rows, counts)
    per_image = rows.groupby("safe_id", sort=False)["iou"].agg(["sum", "count"]).reindex(images)
    _put(entry, "mean_iou", ratio_interval(per_image["sum"].to_numpy(), per_image["count"].to_numpy(), counts))
    uncertainty, error = rows[f"mean_{map_name}"].to_numpy(np.float64), 1.0 - rows["iou"].to_numpy(np.float64)
    if len(rows) >= 2:
        _put(entry, "mask_spearman", percentile_interval(float(weighted_spearman(uncertainty, error)[0]),
                                                         weighted_spearman(uncertainty, error, weights)))
    if is_primary:
        ids, stats = scoreboard.images.stacked(method, set(rows["group"]))
        position = {safe_id: index for index, safe_id in enumerate(ids)}
        if all(safe_id in position for safe_id in images):
            order = [position[safe_id] for safe_id in images]
            stats = {name: values[order] for name, values in stats.items()}
            histogram = stats["error_histogram"]
            histogram = histogram[:, histogram.sum(axis=(0, 2)) > 0]  # empty bins change no AUROC
            _put(entry, "auroc", percentile_interval(float(auroc_from_histograms(histogram.sum(0))),
                                                     auroc_from_histograms(summed(histogram, counts))))
            bins = [stats[name] for name in ("count", "prob_sum", "positive_sum")]
            _put(entry, "ece", percentile_interval(float(ece_from_bins(*(b.sum(0) for b in bins))),
                                                   ece_from_bins(*(summed(b, counts) for b in bins))))
            _put(entry, "nll", ratio_interval(stats["nll_sum"], stats["count"].sum(-1), counts))
    return entry


def mask_quality_frame(masks: pd.DataFrame, methods: list[str], unseen_groups: frozenset[str],
                       resampler: DomainResampler) -> pd.DataFrame:
    """One row per (method, score, domain): how well the score ranks the method's own masks by their
    true IoU (``modules/scoring/mask_quality.py``), with bootstrap intervals over images."""
    entries = []
    if masks.empty or "sam_predicted_iou" not in masks:
        return pd.DataFrame()
    domains = domains_in_order(list(masks["group"].unique()), unseen_groups)
    for method in [m for m in methods if m in set(masks["method"])]:
        own = masks[masks["method"] == method]
        for domain in domains:
            rows = domain_rows(own, domain, unseen_groups)
            if rows.empty:
                continue
            counts = resampler.counts(int(rows["safe_id"].nunique()))
            weights, _ = _mask_weights(rows, counts)
            iou = rows["iou"].to_numpy(np.float64)
            for name, score in QUALITY_SCORES.items():
                quality = quality_values(rows[score.column].to_numpy(np.float64), score)
                point, replicates = quality_metrics(quality, iou), quality_metrics(quality, iou, weights)
                entry = {"method": method, "score": name, "baseline": score.baseline, "domain": domain,
                         "domain_kind": domain_kind_of(domain, unseen_groups),
                         "n_images": int(rows["safe_id"].nunique()), "n_masks": len(rows),
                         "n_bad_masks": int((iou < BAD_MASK_IOU).sum())}
                for metric in MASK_QUALITY_METRICS:
                    interval = percentile_interval(float(point[metric][0]), replicates[metric])
                    entry[metric] = interval.value
                    _put(entry, metric, interval)
                entries.append(entry)
    return pd.DataFrame(entries)
