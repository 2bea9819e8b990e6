"""The outputs of the simulated interactive segmentation (issue #19): per click policy and domain, the
mean IoU after k clicks, NoC@85 / NoC@90, the click-or-stop signal and the IoU-vs-clicks curves.

Input: the click trace of the simulation (``TRACE_COLUMNS``), one row per (image, policy, draw,
clicks) with ``clicks`` = 1 .. ``max_clicks`` for every (image, policy, draw). A policy run several
times on an image (the random policy's draws, ``evaluation.active_prompting.random_draws``) counts
once per image: each per-image value (IoU after k clicks, NoC, whether it is ever reached) is the
mean over its draws, and the images stay the unit every interval resamples. Domains follow the evaluation
report (``modules/evaluation/intervals.py``): each group (seen groups, then unseen ones), then the
``seen`` / ``unseen`` aggregates (only when groups are held out) and ``overall``.

- ``click_tables``: mean IoU after ``CLICK_COUNTS`` clicks (``clicks.csv``), after every click
  (``clicks_curve.csv``, the data of ``clicks_iou.png``) and NoC (``noc.csv``): the first click count
  at which the IoU reaches the threshold, ``max_clicks`` for an image that never does (counted).
- ``stop_signal_frame``: after each click, the mask-level uncertainty (``quality``, higher = less
  sure) as a predictor of "IoU already >= ``STOP_IOU``", so a tool can tell the annotator when to
  stop: AUROC over all (image, draw, clicks) rows, against SAM's predicted IoU (``stop_signal.csv``).
- ``policy_comparison``: ``COMPARISONS`` (BALD against random and entropy), per-image differences
  in NoC@85 and IoU@5, paired over images (``click_comparison.csv``).

Every interval is a 95% percentile bootstrap over the domain's images (``modules/scoring/bootstrap.py``;
the same replicates for every policy of a domain, so paired differences are resampled together). The
oracle policy reads the ground truth to place its clicks: a reference, not a contender; nothing here
reads a mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from modules.core.errors import PipelineError
from modules.core.fileio import atomic_write_csv, remove_file
from modules.evaluation.html_report import ReportSection
from modules.evaluation.intervals import (AGGREGATES, BootstrapSettings, DomainResampler, domain_kind_of,
                                          domain_rows, domains_in_order)
from modules.evaluation.reports import domain_heading, format_interval, markdown_table
from modules.scoring.bootstrap import Interval, percentile_interval, summed
from modules.scoring.mask_quality import QualityScore, quality_values, weighted_auroc
from modules.scoring.plots import plot_click_curves

#: The trace's columns (the contract with ``interactive.simulation``): ``draw`` numbers a policy's runs
#: on one image (0 .. ``random_draws`` - 1 for a random policy, 0 otherwise); ``clicks`` counts the
#: interactions so far (1 = the first click or box); ``x``, ``y`` (ORIGINAL pixels) and ``label``
#: (1 / 0) are those of the click just placed, -1 for the box and for a run that had no pixel left.
TRACE_COLUMNS = ("safe_id", "group", "unseen", "policy", "draw", "clicks", "iou", "quality", "predicted_iou", "x",
                 "y", "label")
#: Click counts of ``clicks.csv`` (those up to ``max_clicks``).
CLICK_COUNTS = (1, 3, 5, 10, 20)
#: IoU levels of NoC (NoC@85, NoC@90).
NOC_THRESHOLDS = (0.85, 0.90)
#: The click-or-stop signal predicts "IoU >= STOP_IOU after these clicks".
STOP_IOU = 0.85
#: The ground-truth-free scores rated as stop signals: name -> the trace column and its direction.
STOP_SCORES = {"uncertainty": QualityScore("quality", higher_is_better=False),
               "sam_predicted_iou": QualityScore("predicted_iou", higher_is_better=True, baseline=True)}
#: ``(policy, baseline)`` pairs of ``policy_comparison``, and the metrics compared (higher is better?).
COMPARISONS = (("bald", "random"), ("bald", "entropy"))
COMPARISON_METRICS = {"noc_85": False, "iou_at_5": True}
CLICKS_CSV, CURVE_CSV, NOC_CSV = "clicks.csv", "clicks_curve.csv", "noc.csv"
STOP_SIGNAL_CSV, COMPARISON_CSV = "stop_signal.csv", "click_comparison.csv"
CLICKS_FIGURE = "clicks_iou.png"
CLICK_FILES = (CLICKS_CSV, CURVE_CSV, NOC_CSV, STOP_SIGNAL_CSV, COMPARISON_CSV, CLICKS_FIGURE)
SECTION_TITLE = "Interactive segmentation: simulated clicks"
#: Bootstrap replicates of the stop-signal AUROC are computed in chunks of at most this many
#: (replicate, row) cells, so a large trace does not hold ``B x rows`` weights at once.
AUROC_CHUNK_CELLS = 4_000_000


class ClickTraceError(PipelineError):
    """A click trace that breaks the contract (missing columns, missing or extra click counts)."""


@dataclass(frozen=True)
class ClickReport:
    """What ``write_click_reports`` wrote: ``markdown`` (the report section's body), ``csvs`` and
    ``figures`` (paths in the report folder) and the tables themselves."""

    folder: Path
    markdown: str
    csvs: list[Path]
    figures: list[Path]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    def section(self) -> ReportSection:
        """The section for ``reports.write_reports`` (summary.md and index.html)."""
        relative = [path.relative_to(self.folder).as_posix() for path in self.csvs]
        shown = {CLICKS_CSV: "Mean IoU after k clicks", NOC_CSV: "Clicks to reach 85% / 90% IoU",
                 STOP_SIGNAL_CSV: "When to stop: the click-or-stop signal", COMPARISON_CSV: comparison_title()}
        return ReportSection(SECTION_TITLE, self.markdown,
                             figures=tuple(path.relative_to(self.folder).as_posix() for path in self.figures),
                             tables=tuple((name, shown[name]) for name in relative if name in shown),
                             files=tuple(name for name in relative if name not in shown))


# --------------------------------------------------------------------------- the trace


def check_trace(trace: pd.DataFrame, max_clicks: int) -> pd.DataFrame:
    """The trace with its columns typed, after checking the contract: every ``TRACE_COLUMNS`` present,
    rows for clicks 1 .. ``max_clicks`` exactly once per (image, policy, draw), one group per image.
    Raises ``ClickTraceError`` naming the first problem."""
    missing = [column for column in TRACE_COLUMNS if column not in trace.columns]
    if missing:
        raise ClickTraceError(f"click trace: missing column(s) {', '.join(missing)}")
    if trace.empty:
        raise ClickTraceError("click trace: no rows")
    if max_clicks < 1:
        raise ClickTraceError(f"click trace: max_clicks must be >= 1, got {max_clicks}")
    trace = trace.astype({"safe_id": str, "group": str, "policy": str, "unseen": bool, "draw": np.int64,
                          "clicks": np.int64, "iou": np.float64, "quality": np.float64, "predicted_iou": np.float64})
    outside = trace[(trace["clicks"] < 1) | (trace["clicks"] > max_clicks)]
    if not outside.empty:
        row = outside.iloc[0]
        raise ClickTraceError(f"click trace: {row['safe_id']} / {row['policy']} has a row for {row['clicks']} clicks "
                              f"(expected 1 .. {max_clicks})")
    per_unit = trace.groupby(["safe_id", "policy", "draw"], sort=False)["clicks"].agg(["size", "nunique"])
    incomplete = per_unit[(per_unit["size"] != max_clicks) | (per_unit["nunique"] != max_clicks)]
    if not incomplete.empty:
        (safe_id, policy, draw), row = incomplete.index[0], incomplete.iloc[0]
        raise ClickTraceError(f"click trace: {safe_id} / {policy} (draw {draw}) has {row['size']} rows for "
                              f"{row['nunique']} distinct click counts (expected clicks 1 .. {max_clicks} once each)")
    groups = trace.groupby("safe_id")["group"].nunique()
    if (groups > 1).any():
        raise ClickTraceError(f"click trace: image {groups[groups > 1].index[0]} is in more than one group")
    return trace


def policies_of(trace: pd.DataFrame) -> list[str]:
    """The policies in order of first appearance in the trace."""
    return list(dict.fromkeys(trace["policy"]))


def trace_domains(trace: pd.DataFrame) -> tuple[list[str], frozenset[str]]:
    """The report's domains of the trace (groups, then the aggregates) and its unseen groups."""
    unseen = frozenset(trace.loc[trace["unseen"], "group"])
    return domains_in_order(list(trace["group"].unique()), unseen), unseen


def run_matrix(rows: pd.DataFrame, max_clicks: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One policy's runs: the images (sorted), each run's image (``R`` codes into them) and ``R x
    max_clicks`` IoUs (column k - 1: after k clicks); one run per (image, draw)."""
    table = rows.pivot(index=["safe_id", "draw"], columns="clicks", values="iou").sort_index()
    table = table.reindex(columns=range(1, max_clicks + 1))
    codes, images = pd.factorize(table.index.get_level_values("safe_id"), sort=True)
    return list(images), codes, table.to_numpy(np.float64)


def image_means(values: np.ndarray, codes: np.ndarray, n_images: int) -> np.ndarray:
    """Per image, the mean of its runs' ``values`` (``R`` or ``R x K``) -> ``n_images`` (or ``n x K``)."""
    values = np.asarray(values, np.float64)
    flat = values.reshape(len(values), -1)
    sums = np.zeros((n_images, flat.shape[1]))
    np.add.at(sums, codes, flat)
    means = sums / np.bincount(codes, minlength=n_images)[:, None]
    return means.reshape((n_images, *values.shape[1:]))


def image_noc(runs: np.ndarray, codes: np.ndarray, n_images: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the NoC at ``threshold`` and the fraction of its runs that never reach it
    (``clicks_to_reach`` of each run of ``run_matrix``, then the mean over the image's draws)."""
    needed, reached = clicks_to_reach(runs, threshold)
    return image_means(needed, codes, n_images), image_means(~reached, codes, n_images)


def clicks_to_reach(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """NoC of each image: ``n`` the first click count whose IoU is >= ``threshold`` (``max_clicks`` =
    ``iou.shape[1]`` where none is), and ``n`` bool: whether it is reached at all. ``iou``: ``n x max_clicks``."""
    reached = iou >= threshold
    ever = reached.any(axis=1)
    return np.where(ever, reached.argmax(axis=1) + 1, iou.shape[1]).astype(np.int64), ever


def mean_interval(values: np.ndarray, counts: np.ndarray) -> list[Interval]:
    """The mean over images of ``values`` (``n`` or ``n x K``) and its interval per column; ``counts``
    ``B x n`` (``bootstrap.resample_counts``)."""
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    replicates = summed(values, counts) / len(values)
    return [percentile_interval(float(values[:, k].mean()), replicates[:, k]) for k in range(values.shape[1])]


def _put(entry: dict, name: str, interval: Interval) -> None:
    entry[name], entry[f"{name}_lo"], entry[f"{name}_hi"] = interval.value, interval.lo, interval.hi


def threshold_label(threshold: float) -> str:
    """``85`` for 0.85: the suffix of the NoC columns."""
    return f"{round(threshold * 100):d}"


# --------------------------------------------------------------------------- tables


def click_tables(trace: pd.DataFrame, max_clicks: int,
                 bootstrap: BootstrapSettings = BootstrapSettings()) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(clicks, curve, noc)`` per policy x domain (domains in report order, policies in trace order),
    each row with ``n_images`` and ``draws`` (the policy's runs per image):

    - clicks: ``n_images`` and ``iou_at_<k>`` with ``_lo`` / ``_hi`` for the ``CLICK_COUNTS`` up to
      ``max_clicks``;
    - curve: one row per click count 1 .. ``max_clicks``: ``mean_iou`` with ``_lo`` / ``_hi``;
    - noc: ``noc_<t>`` (mean NoC, ``max_clicks`` for an image that never reaches the IoU) with
      ``_lo`` / ``_hi`` and ``never_<t>`` (the images that never reach it; for a policy with several
      draws per image, the expected count: each image's fraction of draws that never do, summed)
      per ``NOC_THRESHOLDS``.
    """
    trace = check_trace(trace, max_clicks)
    domains, unseen = trace_domains(trace)
    resampler = DomainResampler(bootstrap)
    counts_shown = [k for k in CLICK_COUNTS if k <= max_clicks]
    clicks, curve, noc = [], [], []
    for domain in domains:
        for policy in policies_of(trace):
            rows = domain_rows(trace[trace["policy"] == policy], domain, unseen)
            if rows.empty:
                continue
            images, codes, runs = run_matrix(rows, max_clicks)
            iou = image_means(runs, codes, len(images))
            counts = resampler.counts(len(images))
            key = {"policy": policy, "domain": domain, "domain_kind": domain_kind_of(domain, unseen),
                   "n_images": len(images), "draws": int(np.bincount(codes).max())}
            per_click = mean_interval(iou, counts)
            entry = dict(key)
            for k in counts_shown:
                _put(entry, f"iou_at_{k}", per_click[k - 1])
            clicks.append(entry)
            for k, interval in enumerate(per_click, start=1):
                point = {**key, "clicks": k}
                _put(point, "mean_iou", interval)
                curve.append(point)
            entry = dict(key)
            for threshold in NOC_THRESHOLDS:
                needed, never = image_noc(runs, codes, len(images), threshold)
                label = threshold_label(threshold)
                _put(entry, f"noc_{label}", mean_interval(needed, counts)[0])
                entry[f"never_{label}"] = float(never.sum())
            noc.append(entry)
    return pd.DataFrame(clicks), pd.DataFrame(curve), pd.DataFrame(noc)


def _replicate_aurocs(confidence: np.ndarray, positive: np.ndarray, codes: np.ndarray,
                      counts: np.ndarray) -> np.ndarray:
    """``B`` AUROCs, each row weighted by how often its image (``codes``) was drawn in the replicate."""
    chunk = max(1, AUROC_CHUNK_CELLS // max(len(confidence), 1))
    return np.concatenate([weighted_auroc(confidence, positive, counts[start:start + chunk][:, codes].astype(np.float64))
                           for start in range(0, len(counts), chunk)])


def stop_signal_frame(trace: pd.DataFrame, max_clicks: int,
                      bootstrap: BootstrapSettings = BootstrapSettings()) -> pd.DataFrame:
    """Per policy x domain, over every (image, draw, clicks) row: the AUROC of each ``STOP_SCORES`` score
    (as a confidence: ``-quality``; SAM's predicted IoU) for detecting ``iou >= STOP_IOU``, with
    intervals from resampling images; ``auroc_difference``: uncertainty minus SAM's predicted IoU on
    the same replicates. ``n_rows``, ``n_positive``: rows and rows at or above ``STOP_IOU``. A score
    that is NaN on a row ranks that row as the least likely to be done. NaN AUROC where every row
    is, or none is, at or above ``STOP_IOU``."""
    trace = check_trace(trace, max_clicks)
    domains, unseen = trace_domains(trace)
    resampler = DomainResampler(bootstrap)
    entries = []
    for domain in domains:
        for policy in policies_of(trace):
            rows = domain_rows(trace[trace["policy"] == policy], domain, unseen)
            if rows.empty:
                continue
            codes, images = pd.factorize(rows["safe_id"], sort=True)
            counts = resampler.counts(len(images))
            positive = rows["iou"].to_numpy(np.float64) >= STOP_IOU
            entry = {"policy": policy, "domain": domain, "domain_kind": domain_kind_of(domain, unseen),
                     "n_images": len(images), "n_rows": len(rows), "n_positive": int(positive.sum())}
            replicates = {}
            for name, score in STOP_SCORES.items():
                confidence = quality_values(rows[score.column].to_numpy(np.float64), score)
                replicates[name] = _replicate_aurocs(confidence, positive, codes, counts)
                _put(entry, f"auroc_{name}", percentile_interval(float(weighted_auroc(confidence, positive)[0]),
                                                                 replicates[name]))
            first, second = STOP_SCORES
            _put(entry, "auroc_difference", percentile_interval(entry[f"auroc_{first}"] - entry[f"auroc_{second}"],
                                                                replicates[first] - replicates[second]))
            entries.append(entry)
    return pd.DataFrame(entries)


def per_image_metric(rows: pd.DataFrame, max_clicks: int, metric: str) -> pd.Series:
    """One policy's per-image values of a ``COMPARISON_METRICS`` metric (``noc_<t>`` or
    ``iou_at_<k>``; the mean over its draws), indexed by ``safe_id``."""
    kind, value = metric.rsplit("_", 1)
    images, codes, runs = run_matrix(rows, max_clicks)
    if kind == "noc":
        values = image_noc(runs, codes, len(images), int(value) / 100.0)[0]
    elif kind == "iou_at":
        values = image_means(runs[:, int(value) - 1], codes, len(images))
    else:
        raise ValueError(f"unknown comparison metric {metric!r}")
    return pd.Series(values, index=images)


def policy_comparison(trace: pd.DataFrame, max_clicks: int | None = None,
                      bootstrap: BootstrapSettings = BootstrapSettings(),
                      pairs: Sequence[tuple[str, str]] = COMPARISONS) -> pd.DataFrame:
    """Per domain, each ``(policy, baseline)`` of ``pairs`` present in the trace and each
    ``COMPARISON_METRICS`` metric defined at ``max_clicks`` (default: the trace's largest click count):
    ``policy_value`` and ``baseline_value`` (means over the images both ran on), ``difference`` = the
    mean of the per-image ``policy - baseline`` with its paired interval (``_lo`` / ``_hi``), and
    ``verdict``: which is better where the interval excludes 0, else ``within noise``."""
    max_clicks = int(trace["clicks"].max()) if max_clicks is None else max_clicks
    trace = check_trace(trace, max_clicks)
    domains, unseen = trace_domains(trace)
    resampler = DomainResampler(bootstrap)
    present = set(trace["policy"])
    metrics = {m: higher for m, higher in COMPARISON_METRICS.items()
               if not m.startswith("iou_at_") or int(m.rsplit("_", 1)[1]) <= max_clicks}
    entries = []
    for domain in domains:
        for policy, baseline in [pair for pair in pairs if set(pair) <= present]:
            ours = domain_rows(trace[trace["policy"] == policy], domain, unseen)
            theirs = domain_rows(trace[trace["policy"] == baseline], domain, unseen)
            images = sorted(set(ours["safe_id"]) & set(theirs["safe_id"]))
            if not images:
                continue
            counts = resampler.counts(len(images))
            for metric, higher_better in metrics.items():
                mine = per_image_metric(ours, max_clicks, metric).reindex(images).to_numpy()
                other = per_image_metric(theirs, max_clicks, metric).reindex(images).to_numpy()
                entry = {"domain": domain, "domain_kind": domain_kind_of(domain, unseen), "policy": policy,
                         "baseline": baseline, "metric": metric, "higher_is_better": higher_better,
                         "n_images": len(images), "policy_value": float(mine.mean()),
                         "baseline_value": float(other.mean())}
                difference = mean_interval(mine - other, counts)[0]
                _put(entry, "difference", difference)
                entry["verdict"] = comparison_verdict(difference, higher_better, policy, baseline)
                entries.append(entry)
    return pd.DataFrame(entries)


def comparison_title() -> str:
    """``Paired comparisons: bald vs random, bald vs entropy`` (``COMPARISONS``)."""
    return "Paired comparisons: " + ", ".join(f"{policy} vs {baseline}" for policy, baseline in COMPARISONS)


def comparison_verdict(difference: Interval, higher_better: bool, policy: str, baseline: str) -> str:
    """``<policy> better`` / ``<baseline> better`` where the interval of ``policy - baseline``
    excludes 0, ``within noise`` otherwise (or when it is undefined)."""
    if not difference.lo > 0 and not difference.hi < 0:
        return "within noise"
    return f"{policy if (difference.lo > 0) == higher_better else baseline} better"


# --------------------------------------------------------------------------- markdown, figure


def _domain_title(frame: pd.DataFrame, domain: str) -> str:
    rows = frame[frame["domain"] == domain]
    return domain_heading(domain, str(rows["domain_kind"].iloc[0]), int(rows["n_images"].max()))


def _cell(row, name: str) -> str:
    """``value [lo, hi]`` of a table row."""
    return format_interval(getattr(row, name), getattr(row, f"{name}_lo"), getattr(row, f"{name}_hi"))


def _aggregates(frame: pd.DataFrame) -> list[str]:
    return [domain for domain in AGGREGATES if not frame.empty and domain in set(frame["domain"])]


def click_markdown(clicks: pd.DataFrame, noc: pd.DataFrame, stop: pd.DataFrame, comparison: pd.DataFrame,
                   max_clicks: int, bootstrap_samples: int, figures: Sequence[str]) -> str:
    """The report section's body (no title): what was simulated, then per aggregate domain the IoU@k,
    NoC, stop-signal and comparison tables, each with what it means, and the files."""
    policies = list(dict.fromkeys(clicks["policy"]))
    oracles = [p for p in policies if "oracle" in p]
    drawn = clicks[clicks["draws"] > 1].drop_duplicates("policy")
    lines = [f"Each image is segmented click after click by each policy, up to {max_clicks} clicks (the first "
             f"included): {', '.join(f'`{p}`' for p in policies)}. "
             + (f"{', '.join(f'`{p}`' for p in oracles)} reads the ground truth to place its clicks (the "
                "simulated annotator of interactive-segmentation benchmarks): a reference, not a contender. "
                if oracles else "")
             + "".join(f"`{row.policy}` runs {row.draws} times per image (independent draws); each of its per-image "
                       "figures is the mean over them. " for row in drawn.itertuples(index=False))
             + f"n = images; `value [lo, hi]`: the value and its 95% bootstrap interval over the domain's images "
             f"({bootstrap_samples} replicates). Shown: the aggregates; per group rows are in the CSV files.", ""]
    counts = [int(c.rsplit("_", 1)[1]) for c in clicks.columns if c.startswith("iou_at_") and c[7:].isdigit()]
    lines += [f"### Mean IoU after k clicks ([{CLICKS_CSV}]({CLICKS_CSV}))", "",
              "The mean over images of the IoU after k clicks (higher is better). After every click: "
              + ", ".join(f"[{name}]({name})" for name in figures)
              + f" (its data: [{CURVE_CSV}]({CURVE_CSV})).", ""]
    for domain in _aggregates(clicks):
        lines += [f"#### {_domain_title(clicks, domain)}", "", markdown_table(pd.DataFrame(
            [{"policy": row.policy, **{f"IoU@{k}": _cell(row, f"iou_at_{k}") for k in counts}}
             for row in clicks[clicks["domain"] == domain].itertuples(index=False)])), ""]
    labels = [threshold_label(t) for t in NOC_THRESHOLDS]
    lines += [f"### Clicks to reach {' / '.join(f'{label}%' for label in labels)} IoU ([{NOC_CSV}]({NOC_CSV}))", "",
              f"NoC@{labels[0]}: the first click count at which the IoU is >= {NOC_THRESHOLDS[0]:g}, {max_clicks} (the "
              "cap) for an image that never gets there; the mean over images (lower is better). `never`: the "
              f"images that do not reach it within {max_clicks} clicks (for a policy with several draws, the "
              "expected count: per image, the fraction of its draws that never do).", ""]
    for domain in _aggregates(noc):
        lines += [f"#### {_domain_title(noc, domain)}", "", markdown_table(pd.DataFrame(
            [{"policy": row.policy, **{key: value for label in labels for key, value in
                                       ((f"NoC@{label}", _cell(row, f"noc_{label}")),
                                        (f"never@{label}", f"{getattr(row, f'never_{label}'):g}"))}}
             for row in noc[noc["domain"] == domain].itertuples(index=False)])), ""]
    lines += [f"### When to stop: the click-or-stop signal ([{STOP_SIGNAL_CSV}]({STOP_SIGNAL_CSV}))", "",
              f"After each click, does the mask-level uncertainty say whether the IoU already is >= {STOP_IOU:g} (the "
              "annotator can stop)? The AUROC over every (image, draw, clicks) row of the low uncertainty "
              "(`-quality`) for detecting those rows (higher is better, 0.5 = chance), beside SAM's own "
              "predicted IoU (the free baseline); `difference`: uncertainty minus baseline on the same "
              "resampled images.", ""]
    for domain in _aggregates(stop):
        lines += [f"#### {_domain_title(stop, domain)}", "", markdown_table(pd.DataFrame(
            [{"policy": row.policy, "rows": row.n_rows, f"IoU >= {STOP_IOU:g}": row.n_positive,
              "AUROC uncertainty": _cell(row, "auroc_uncertainty"),
              "AUROC SAM predicted IoU": _cell(row, "auroc_sam_predicted_iou"),
              "difference": _cell(row, "auroc_difference")}
             for row in stop[stop["domain"] == domain].itertuples(index=False)])), ""]
    lines += [f"### {comparison_title()} ([{COMPARISON_CSV}]({COMPARISON_CSV}))", ""]
    if comparison.empty:
        lines += ["Not compared: the trace lacks a policy of "
                  + ", ".join(f"{policy} vs {baseline}" for policy, baseline in COMPARISONS) + ".", ""]
    else:
        lines += ["Per image, the policy's value minus the baseline's, averaged over the images both ran on, "
                  "with its paired interval. NoC@85: below 0 = the policy needs fewer clicks; IoU@5: above 0 = "
                  "the policy's masks are better. `verdict`: which is better where the interval excludes 0.", ""]
        lines += [markdown_table(pd.DataFrame(
            [{"domain": _domain_title(comparison, row.domain), "comparison": f"{row.policy} - {row.baseline}",
              "metric": row.metric, "difference": _cell(row, "difference"), "verdict": row.verdict}
             for row in comparison[comparison["domain"].isin(AGGREGATES)].itertuples(index=False)])), ""]
    return "\n".join(lines).rstrip() + "\n"


def curves_by_domain(curve: pd.DataFrame) -> dict[str, dict]:
    """The aggregates' curves in the layout ``plots.plot_click_curves`` takes."""
    panels = {}
    for domain in _aggregates(curve):
        rows = curve[curve["domain"] == domain]
        panels[domain] = {"n_images": int(rows["n_images"].max()), "policies": {
            policy: {"clicks": part["clicks"].tolist(), "mean": part["mean_iou"].tolist(),
                     "lo": part["mean_iou_lo"].tolist(), "hi": part["mean_iou_hi"].tolist()}
            for policy, part in rows.groupby("policy", sort=False)}}
    return panels


# --------------------------------------------------------------------------- everything


def tidy(frame: pd.DataFrame, decimals: int = 6) -> pd.DataFrame:
    """Floats rounded to ``decimals`` and without a negative zero (``-0.0`` reads as a signed result)."""
    frame = frame.copy()
    for column in frame.columns:
        if pd.api.types.is_float_dtype(frame[column]):
            frame[column] = frame[column].round(decimals) + 0.0
    return frame


def remove_click_reports(folder: Path) -> None:
    """Delete the files ``write_click_reports`` writes (a run without the simulation must not leave
    an earlier run's behind)."""
    for name in CLICK_FILES:
        remove_file(Path(folder) / name, folder)


def write_click_reports(folder: Path, trace: pd.DataFrame, max_clicks: int, bootstrap_samples: int,
                        bootstrap_seed: int, tracker=None) -> ClickReport:
    """Write ``clicks.csv``, ``clicks_curve.csv``, ``noc.csv``, ``stop_signal.csv``,
    ``click_comparison.csv`` and ``clicks_iou.png`` (mean IoU vs clicks, one panel per aggregate
    domain) into the report folder, atomically; log the tables (and the figure) to ``tracker``. The
    returned report's ``section()`` goes to ``reports.write_reports``."""
    folder = Path(folder)
    bootstrap = BootstrapSettings(int(bootstrap_samples), int(bootstrap_seed))
    trace = check_trace(trace, max_clicks)
    clicks, curve, noc = click_tables(trace, max_clicks, bootstrap)
    stop = stop_signal_frame(trace, max_clicks, bootstrap)
    comparison = policy_comparison(trace, max_clicks, bootstrap)
    tables = {CLICKS_CSV: clicks, CURVE_CSV: curve, NOC_CSV: noc, STOP_SIGNAL_CSV: stop, COMPARISON_CSV: comparison}
    csvs = []
    for name, frame in tables.items():
        atomic_write_csv(folder / name, tidy(frame))
        csvs.append(folder / name)
    figure = folder / CLICKS_FIGURE
    plot_click_curves(curves_by_domain(curve), figure, f"Mean IoU after each click ({folder.name})",
                      dashed=[p for p in policies_of(trace) if "oracle" in p], thresholds=NOC_THRESHOLDS)
    markdown = click_markdown(clicks, noc, stop, comparison, max_clicks, bootstrap.samples, [CLICKS_FIGURE])
    if tracker is not None:
        for name, frame in tables.items():
            if not frame.empty:
                tracker.log_table(f"eval/{Path(name).stem}", tidy(frame))
        tracker.log_image(f"eval/{figure.stem}", figure)
    return ClickReport(folder, markdown, csvs, [figure], tables)
