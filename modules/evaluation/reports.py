"""The evaluation stage's report files in ``<project_root>/reports/eval/<name>/`` (CSV tables, markdown
summaries, reliability and sparsification plots, qualitative panels) and their W&B copies.

All files are written atomically; ``reports.md5.json`` (``DIGEST_FILE``: the md5 of every file
``write_reports`` wrote) is written last, so a report is complete when it exists and every file still
has its md5 (``reports_complete``); a rerun rewrites the reports from the saved state otherwise.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

from modules.core.fileio import (atomic_write_csv, atomic_write_json, atomic_write_text, file_md5, read_json,
                                 remove_file, remove_tree)
from modules.core.lineage import evaluation_artifact, evaluation_model_inputs
from modules.evaluation.html_report import HTML_REPORT, ReportSection, html_report
from modules.data.domains import SEEN, UNSEEN
from modules.evaluation.intervals import (AGGREGATES, BootstrapSettings, DomainResampler, domain_kind_of,
                                          domain_rows, domains_in_order, mask_quality_frame, summary_intervals)
from modules.evaluation.methods import ORACLE_METHODS
from modules.evaluation.samples import LabelledSample
from modules.evaluation.scoreboard import OVERALL, SEGMENTATION_KEYS, Scoreboard, ScoredMethod
from modules.scoring import metrics
from modules.scoring.plots import plot_qualitative_panel, plot_reliability_diagram, plot_sparsification

QUALITATIVE_DIR = "qualitative"
SUMMARY_MARKDOWN = "summary.md"
DIGEST_FILE = "reports.md5.json"
CSV_FILES = ("per_mask.csv", "summary_by_domain.csv", "summary_overall.csv", "reliability_bins.csv",
             "sparsification_curves.csv", "refinement.csv", "mask_quality.csv")
#: summary.md: (column of the summary tables, heading, higher is better?).
KEY_METRICS = (
    ("mean_iou", "IoU (mean over masks)", True),
    ("ece", "ECE", False),
    ("nll", "NLL (nats / pixel)", False),
    ("auroc", "AUROC of error detection (primary map)", True),
    ("error_to_correct_ratio", "Mean uncertainty on error pixels / on correct pixels (primary map)", True),
    ("ause", "AUSE (primary map)", False),
    ("mask_spearman", "Spearman(mean uncertainty, 1 - IoU) across masks (primary map)", True),
)
#: The tables the HTML report shows in full (besides summary.md's), with their headings.
HTML_TABLES = (("summary_overall.csv", "All metrics, every map, all domains together"),
               ("summary_by_domain.csv", "All metrics, every map, per domain"),
               ("mask_quality.csv", "Which masks to check: mask-level quality scores"),
               ("refinement.csv", "Refinement"))
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def file_label(name: str) -> str:
    """A domain or method name as a file-name part."""
    return _UNSAFE.sub("_", name) or "_"


# --------------------------------------------------------------------------- bookkeeping


def remove_reports(folder: Path) -> None:
    """Delete the report files of an earlier run (a fresh run must not leave stale domains behind)."""
    for pattern in (*CSV_FILES, "*.png", "*.md", HTML_REPORT, DIGEST_FILE):
        for path in folder.glob(pattern):
            remove_file(path, folder)
    remove_tree(folder / QUALITATIVE_DIR, folder)


def reports_complete(folder: Path) -> bool:
    """Whether ``write_reports`` finished in ``folder`` and none of its files was changed or damaged since."""
    try:
        recorded = read_json(folder / DIGEST_FILE)
    except (OSError, ValueError):
        return False
    required = {*CSV_FILES, "refinement.md", SUMMARY_MARKDOWN, HTML_REPORT}
    return (isinstance(recorded, dict) and required <= set(recorded)
            and all((folder / name).is_file() and file_md5(folder / name) == md5 for name, md5 in recorded.items()))


# --------------------------------------------------------------------------- tables


def summary_frame(scoreboard: Scoreboard, methods: list[str], refinement_methods: list[str],
                  bootstrap: BootstrapSettings = BootstrapSettings()) -> pd.DataFrame:
    """One row per (method, map, domain): streaming metrics + per-mask means + mask-level Spearman, the
    domain's kind (``seen`` / ``unseen`` / ``all``), its image count and the bootstrap intervals
    (``<column>_lo`` / ``_hi``, ``intervals.INTERVAL_COLUMNS``). Rows go seen groups, unseen groups,
    then the aggregates (``seen``, ``unseen``, ``overall``)."""
    masks = pd.DataFrame(scoreboard.rows)
    unseen = scoreboard.unseen_groups
    resampler = DomainResampler(bootstrap)
    entries = []
    for (method, map_name, domain), accumulator in scoreboard.accumulators.items():
        selected = domain_rows(masks[masks["method"] == method], domain, unseen)
        is_primary = scoreboard.primary_maps.get(method) == map_name
        entry = {"method": method, "kind": "refinement" if method in refinement_methods else "strategy",
                 "map": map_name, "is_primary": is_primary, "domain": domain,
                 "domain_kind": domain_kind_of(domain, unseen), "n_masks": len(selected),
                 "ece_bins": scoreboard.ece_bins, **accumulator.compute()}
        entry["mask_spearman"] = _mask_spearman(selected[f"mean_{map_name}"], 1.0 - selected["iou"])
        entry.update({f"mean_{key}": float(selected[key].mean()) for key in SEGMENTATION_KEYS})
        entry.update(summary_intervals(scoreboard, selected, method, map_name, is_primary, resampler))
        entries.append(entry)
    frame = pd.DataFrame(entries)
    method_order = {method: index for index, method in enumerate(methods)}
    domain_order = {domain: index for index, domain in enumerate(domains_in_order(
        [d for d in frame["domain"].unique() if d not in AGGREGATES], unseen))}
    frame["_method_order"] = frame["method"].map(method_order)
    frame["_domain_order"] = frame["domain"].map(domain_order)
    frame = frame.sort_values(["_domain_order", "_method_order", "is_primary", "map"],
                              ascending=[True, True, False, True])
    return frame.drop(columns=["_method_order", "_domain_order"]).reset_index(drop=True)


def _mask_spearman(mean_uncertainty: pd.Series, one_minus_iou: pd.Series) -> float:
    if len(mean_uncertainty) < 2:
        return math.nan
    return metrics.spearman(torch.tensor(mean_uncertainty.to_numpy(dtype=np.float64)),
                            torch.tensor(one_minus_iou.to_numpy(dtype=np.float64)))


def curve_frames(scoreboard: Scoreboard) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Reliability bins and sparsification curves (long tables) of every method's primary map,
    and ``{domain: {method: curves}}`` for the plots."""
    reliability_rows, sparsification_rows = [], []
    curves_by_domain: dict[str, dict[str, dict]] = {}
    for (method, map_name, domain), accumulator in scoreboard.accumulators.items():
        if scoreboard.primary_maps.get(method) != map_name:
            continue
        curves = accumulator.curves()
        curves_by_domain.setdefault(domain, {})[method] = curves
        bins = curves["reliability"]["reliability"]
        for index in range(len(bins["count"])):
            reliability_rows.append({"method": method, "domain": domain, "n_bins": curves["reliability"]["n_bins"],
                                     **{key: bins[key][index] for key in bins}})
        sparsification = curves["sparsification"]
        for index, fraction in enumerate(sparsification["fractions"]):
            sparsification_rows.append({"method": method, "map": map_name, "domain": domain,
                                        "fraction_removed": fraction,
                                        "uncertainty": sparsification["uncertainty"][index],
                                        "oracle": sparsification["oracle"][index],
                                        "random": sparsification["random"]})
    return pd.DataFrame(reliability_rows), pd.DataFrame(sparsification_rows), curves_by_domain


def refinement_frame(summary: pd.DataFrame, baselines: list[str], variants: list[str],
                     unrefined: str) -> pd.DataFrame:
    """Per domain: the unrefined baselines beside the refinement variants (primary-map rows)."""
    primary = summary[summary["is_primary"] & summary["method"].isin([*baselines, *variants])]
    columns = ["domain", "method", "n_masks", "mean_iou", "mean_dice", "mean_boundary_iou_1pct", "ece", "nll",
               "auroc", *(c for c in ("n_images", "mean_iou_lo", "mean_iou_hi") if c in summary)]
    frame = primary[columns].copy()
    reference = frame[frame["method"] == unrefined].set_index("domain")["mean_iou"]
    frame[f"delta_iou_vs_{unrefined}"] = frame["mean_iou"] - frame["domain"].map(reference)
    order = {method: index for index, method in enumerate([*baselines, *variants])}
    frame["_order"] = frame["method"].map(order)
    frame["_overall"] = frame["domain"].map({domain: index + 1 for index, domain in enumerate(AGGREGATES)}).fillna(0)
    return frame.sort_values(["_overall", "domain", "_order"]).drop(columns=["_order", "_overall"]).reset_index(drop=True)


def _format(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        return _unsigned_zero(f"{value:.4f}")
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of a small frame (index ignored), floats with 4 decimals."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_format(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _unseen_groups(summary: pd.DataFrame) -> frozenset[str]:
    if "domain_kind" not in summary:
        return frozenset()
    return frozenset(summary.loc[(summary["domain_kind"] == "unseen") & ~summary["domain"].isin(AGGREGATES),
                                 "domain"])


def method_by_domain(summary: pd.DataFrame, column: str, methods: list[str]) -> pd.DataFrame:
    """``methods`` x (seen groups, unseen groups, then the aggregates) table of one column over the
    primary-map rows."""
    primary = summary[summary["is_primary"]]
    table = primary.pivot_table(index="method", columns="domain", values=column, aggfunc="first", dropna=False)
    unseen = _unseen_groups(summary)
    domains = [d for d in domains_in_order([d for d in table.columns if d not in AGGREGATES], unseen)
               if d in table.columns]
    table = table.reindex(index=[m for m in methods if m in table.index], columns=domains)
    return table.reset_index()


def domain_counts(per_mask: pd.DataFrame) -> pd.DataFrame:
    """Images and masks (sample x prompt set) evaluated per domain, then overall: columns
    ``domain``, ``images``, ``masks``."""
    masks = per_mask.drop_duplicates(["safe_id", "promptset_id"])
    rows = [{"domain": domain, "images": group["safe_id"].nunique(), "masks": len(group)}
            for domain, group in sorted(masks.groupby("group"), key=lambda item: str(item[0]))]
    rows.append({"domain": OVERALL, "images": masks["safe_id"].nunique(), "masks": len(masks)})
    return pd.DataFrame(rows, columns=["domain", "images", "masks"])


def best_methods(table: pd.DataFrame, higher_better: bool, candidates: Iterable[str]) -> dict[str, set[str]]:
    """``{domain column: methods with the best value}`` of a ``method_by_domain`` table, among
    ``candidates`` (the oracle ablations compete with nothing); values equal to the 4 decimals shown
    are ties, all best."""
    eligible = table[table["method"].isin(list(candidates))]
    best: dict[str, set[str]] = {}
    for column in table.columns[1:]:
        values = pd.to_numeric(eligible[column], errors="coerce").round(4)
        if values.notna().any():
            target = values.max() if higher_better else values.min()
            best[column] = set(eligible.loc[values == target, "method"])
    return best


def metric_markdown(summary: pd.DataFrame, column: str, methods: list[str], higher_better: bool) -> str:
    """``method_by_domain`` of ``column`` as a markdown table: the best non-oracle value per domain in
    bold, and ``value [lo, hi]`` where the summary has ``<column>_lo`` / ``<column>_hi`` interval columns."""
    table = method_by_domain(summary, column, methods)
    bold = best_methods(table, higher_better, [m for m in methods if m not in ORACLE_METHODS])
    intervals = {f"{column}_lo", f"{column}_hi"} <= set(summary.columns)
    if intervals:
        low = method_by_domain(summary, f"{column}_lo", methods).set_index("method")
        high = method_by_domain(summary, f"{column}_hi", methods).set_index("method")
    shown = table.astype(object)
    for row, method in enumerate(table["method"]):
        for domain in table.columns[1:]:
            text = _format(table.at[row, domain])
            if intervals and text != "n/a" and not pd.isna(low.at[method, domain]):
                text += f" [{_format(low.at[method, domain])}, {_format(high.at[method, domain])}]"
            shown.at[row, domain] = f"**{text}**" if method in bold.get(domain, ()) else text
    return markdown_table(shown.rename(columns=domain_headings(summary, list(table.columns[1:]))))


def figure_links(figures: Iterable[str]) -> list[str]:
    """Markdown list items linking report-relative figure paths."""
    return [f"- [{name}]({name})" for name in figures]


def _unsigned_zero(text: str) -> str:
    """A number that rounds to zero without its sign (``-0.000`` reads as a signed result)."""
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def format_interval(value: float, lo: float, hi: float) -> str:
    """``0.843 [0.801, 0.880]``; the value alone when the interval is undefined; ``n/a`` for NaN.
    A figure that rounds to zero carries no sign."""
    if value is None or math.isnan(value):
        return "n/a"
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return _unsigned_zero(f"{value:.3f}")
    return f"{_unsigned_zero(f'{value:.3f}')} [{_unsigned_zero(f'{lo:.3f}')}, {_unsigned_zero(f'{hi:.3f}')}]"


def domain_heading(domain: str, kind: str, n_images: int) -> str:
    """A domain's column heading with its image count: ``thin (unseen, n=4 images)``."""
    label = f"{kind}, " if kind == "unseen" and domain not in AGGREGATES else ""
    return f"{domain} ({label}n={n_images} images)"


def domain_headings(summary: pd.DataFrame, domains: list[str]) -> dict[str, str]:
    """Each domain's column heading with its kind and image count (when the summary has them)."""
    if "n_images" not in summary:
        return {}
    primary = summary[summary["is_primary"]]
    headings = {}
    for domain in domains:
        rows = primary[primary["domain"] == domain]
        n_images = int(rows["n_images"].max()) if len(rows) else 0
        kind = str(rows["domain_kind"].iloc[0]) if "domain_kind" in rows and len(rows) else ""
        headings[domain] = domain_heading(domain, kind, n_images)
    return headings


def mask_quality_markdown(mask_quality: pd.DataFrame) -> list[str]:
    """The summary.md section on which masks to check: per aggregate, every (method, score)'s AUROC of
    flagging IoU < 0.5, Spearman with IoU and AURC, and the best score on unseen groups against SAM's
    predicted IoU."""
    if mask_quality.empty:
        return []
    lines = ["## Which masks should a person check (mask-level quality)", "",
             "Per mask, a quality score from each method's primary map, computed without the ground truth: "
             "`boundary_band` (mean uncertainty in a band around the predicted boundary), `foreground` (mean "
             "uncertainty over the predicted mask), `expected_iou` (IoU of the prediction under its own "
             "probabilities); `sam_predicted_iou` (SAM's own IoU prediction) is the baseline. Each rates the "
             "method's own masks: AUROC of flagging masks with IoU < 0.5 (higher is better), Spearman with "
             "the IoU (higher is better), area under the risk-coverage curve with risk 1 - IoU (lower is "
             "better). 95% bootstrap intervals over images.", ""]
    aggregates = [d for d in AGGREGATES if d in set(mask_quality["domain"])]
    for domain in aggregates:
        rows = mask_quality[mask_quality["domain"] == domain]
        first = rows.iloc[0]
        lines += [f"### {domain_heading(domain, str(first['domain_kind']), int(rows['n_images'].max()))}, "
                  f"{int(rows['n_bad_masks'].max())} of {int(rows['n_masks'].max())} masks per method below IoU 0.5", ""]
        table = pd.DataFrame([{"method": row.method, "score": row.score,
                               **{metric: format_interval(getattr(row, metric), getattr(row, f"{metric}_lo"),
                                                          getattr(row, f"{metric}_hi"))
                                  for metric in ("auroc_bad", "spearman", "aurc")}}
                              for row in rows.itertuples(index=False)])
        lines += [markdown_table(table), ""]
    unseen = mask_quality[(mask_quality["domain"] == "unseen")]
    if not unseen.empty:
        lines += [best_against_baseline(unseen), ""]
    return lines


def best_against_baseline(rows: pd.DataFrame) -> str:
    """One sentence: the best method score on these rows (by AUROC of flagging IoU < 0.5) against SAM's
    predicted IoU on raw SAM's masks, and whether the intervals separate them."""
    methods = rows[~rows["baseline"]].dropna(subset=["auroc_bad"])
    baseline = rows[rows["baseline"] & (rows["method"] == "raw_sam")].dropna(subset=["auroc_bad"])
    if methods.empty or baseline.empty:
        return ("Unseen groups: no comparison with SAM's predicted IoU (raw_sam not evaluated, or no AUROC of "
                "flagging bad masks defined: no bad or no good masks).")
    best, base = methods.loc[methods["auroc_bad"].idxmax()], baseline.iloc[0]
    if best["auroc_bad_lo"] > base["auroc_bad_hi"]:
        verdict = "above it, beyond the noise (the intervals do not overlap)"
    elif best["auroc_bad"] > base["auroc_bad"]:
        verdict = "above it, but within the noise (the intervals overlap)"
    else:
        verdict = "not above it"
    return (f"Unseen groups: the best method score, {best['method']} / {best['score']} (AUROC "
            f"{format_interval(best['auroc_bad'], best['auroc_bad_lo'], best['auroc_bad_hi'])}), is {verdict} "
            f"against SAM's predicted IoU on raw SAM's masks "
            f"({format_interval(base['auroc_bad'], base['auroc_bad_lo'], base['auroc_bad_hi'])}).")


def summary_markdown(summary: pd.DataFrame, refinement: pd.DataFrame, refinement_md: str, methods: list[str],
                     n_samples: int, n_masks: int, ece_bins: int, counts: pd.DataFrame | None = None,
                     figures: Iterable[str] = (), mask_quality: pd.DataFrame | None = None,
                     bootstrap_samples: int | None = None, sections: Iterable[ReportSection] = ()) -> str:
    """The report's summary.md; ``sections``: each one's title (a ``##`` heading) and text go after the
    evaluation's own sections, its files into the file list."""
    sections = list(sections)
    strategies = [m for m in methods if m in set(summary.loc[summary["kind"] == "strategy", "method"])]
    primary = summary[summary["is_primary"] & (summary["domain"] == OVERALL)].set_index("method")["map"]
    lines = ["# Uncertainty evaluation", "",
             f"{n_samples} images; {n_masks} rows in per_mask.csv (image x prompt set x method). "
             f"Scored at ground-truth resolution. ECE with {ece_bins} equal-width bins of the foreground "
             "probability. Uncertainty metrics use each method's primary map: "
             + ", ".join(f"{m}: {primary.get(m, '?')}" for m in strategies) + ".", ""]
    if counts is not None and not counts.empty:
        lines += ["## Data", "", "Images and masks (image x prompt set) evaluated per domain.", "",
                  markdown_table(counts), ""]
    oracles = [m for m in methods if m in ORACLE_METHODS and m in set(summary["method"])]
    if oracles:
        lines += ["Oracle ablations (they read the ground truth, which no deployed system has; shown for "
                  f"comparison only): {', '.join(oracles)}.", ""]
    unseen = _unseen_groups(summary)
    if unseen:
        lines += [f"Unseen domains (data.unseen_groups, never trained, validated or tuned on): "
                  f"{', '.join(sorted(unseen))}; `seen` and `unseen` pool the groups of each kind.", ""]
    lines += ["In each table the best value per domain is in **bold** (oracle ablations excluded)"
              + (f"; `value [lo, hi]`: the value and its 95% bootstrap interval over the domain's images "
                 f"({bootstrap_samples} replicates); n = images of the domain"
                 if bootstrap_samples and any(c.endswith("_lo") for c in summary.columns) else "") + ".", ""]
    for column, heading, higher_better in KEY_METRICS:
        lines += [f"## {heading} ({'higher' if higher_better else 'lower'} is better)", "",
                  metric_markdown(summary[summary["kind"] == "strategy"], column, strategies, higher_better), ""]
    if mask_quality is not None:
        lines += mask_quality_markdown(mask_quality)
    if not refinement.empty:
        lines += ["## Dense embedding fusion refinement", "", refinement_md, ""]
    for section in sections:
        lines += [f"## {section.title}", "", section.markdown.strip(), ""]
    figures = [*figures, *(name for section in sections for name in section.figures)]
    lines += ["## Files", "", "Tables: [per_mask.csv](per_mask.csv), [summary_by_domain.csv](summary_by_domain.csv), "
              "[summary_overall.csv](summary_overall.csv), [mask_quality.csv](mask_quality.csv), "
              "[refinement.csv](refinement.csv); everything in one "
              f"page: [{HTML_REPORT}]({HTML_REPORT}).", ""]
    for section in sections:
        files = [name for name in section.written if name not in section.figures]
        if files:
            lines += [f"{section.title}: " + ", ".join(f"[{name}]({name})" for name in files) + ".", ""]
    if figures:
        lines += ["Figures:", "", *figure_links(figures), ""]
    return "\n".join(lines)


def refinement_markdown(refinement: pd.DataFrame, unrefined: str, note: str = "") -> str:
    if refinement.empty:
        return "Refinement not evaluated (evaluation.refinement is false)."
    methods = list(dict.fromkeys(refinement["method"]))
    iou = refinement.pivot_table(index="method", columns="domain", values="mean_iou", aggfunc="first")
    domains = sorted(d for d in iou.columns if d not in AGGREGATES) + [d for d in AGGREGATES if d in iou.columns]
    iou = iou.reindex(index=methods, columns=domains).reset_index()
    overall = refinement[refinement["domain"] == OVERALL].drop(columns=["domain"])
    return "\n".join([
        "Mean IoU per domain. `refined`: fusion with the configured uncertainty source on SAM's first pass; "
        "`refined_constant`: the same with a constant uncertainty map (ablation); `refined_oracle_mask`: the "
        "ground-truth mask as the mask prompt (oracle ablation).", *([note] if note else []), "",
        markdown_table(iou), "", f"Overall (deltas against `{unrefined}`):", "", markdown_table(overall)])


# --------------------------------------------------------------------------- figures


def write_qualitative_panels(folder: Path, labelled: LabelledSample, scored: dict[str, ScoredMethod],
                             methods: Iterable[str], prompt_mode: str | None = None) -> list[Path]:
    """One panel per method for the sample's first prompt set, its clicks drawn (and its box where
    ``prompt_mode`` prompts SAM with it; None: drawn too). Methods whose primary maps are of one kind
    share one colour scale (the range over those methods on this prompt set), so panels compare."""
    sample = labelled.inputs
    promptset_id = int(sample.record["promptsets"][0]["promptset_id"])
    gt = torch.from_numpy(labelled.ground_truth)
    shown = [method for method in methods if method in scored]
    primaries = {method: scored[method].maps[scored[method].primary_map][0].float().cpu() for method in shown}
    ranges = shared_colour_ranges({method: (scored[method].primary_map, primaries[method]) for method in shown})
    box = sample.boxes[0] if prompt_mode in (None, "box", "points_and_box") else None
    paths = []
    for method in shown:
        output = scored[method]
        prob = output.prob[0].float().cpu()
        prediction = prob > metrics.PROB_THRESHOLD
        union = int((prediction | gt).sum())
        iou = int((prediction & gt).sum()) / union if union else 1.0
        path = folder / QUALITATIVE_DIR / file_label(method) / f"{file_label(sample.safe_id)}_{promptset_id}.png"
        title = (f"{method} ({output.primary_map}) | {sample.group} / {sample.safe_id} prompt set {promptset_id} "
                 f"| IoU {iou:.3f}")
        plot_qualitative_panel(sample.image, labelled.ground_truth, prob, primaries[method], path, title,
                               points=sample.points[0], point_labels=sample.labels[0], box=box,
                               uncertainty_range=ranges[output.primary_map], uncertainty_name=output.primary_map)
        paths.append(path)
    return paths


def shared_colour_ranges(maps: dict[str, tuple[str, torch.Tensor]]) -> dict[str, tuple[float, float]]:
    """``{map kind: (vmin, vmax)}`` over every method's map of that kind (``{method: (kind, H x W map)}``);
    a constant map gets a range of width 1e-6 so the colour bar stays drawable."""
    ranges: dict[str, tuple[float, float]] = {}
    for kind, values in maps.values():
        finite = values[torch.isfinite(values)]
        if finite.numel() == 0:
            continue
        low, high = float(finite.min()), float(finite.max())
        if kind in ranges:
            low, high = min(low, ranges[kind][0]), max(high, ranges[kind][1])
        ranges[kind] = (low, high)
    for kind, (low, high) in ranges.items():
        if high - low < 1e-6:
            ranges[kind] = (low, low + 1e-6)
    return {kind: ranges.get(kind, (0.0, 1.0)) for kind, _ in maps.values()}


def write_curve_plots(folder: Path, curves_by_domain: dict[str, dict[str, dict]], strategies: list[str]) -> list[Path]:
    paths = []
    for domain, by_method in curves_by_domain.items():
        shown = {m: by_method[m] for m in strategies if m in by_method}
        if not shown:
            continue
        label = file_label(domain)
        reliability = folder / f"reliability_{label}.png"
        plot_reliability_diagram({m: c["reliability"] for m, c in shown.items()}, reliability,
                                 f"Reliability ({domain})")
        sparsification = folder / f"sparsification_{label}.png"
        plot_sparsification({m: c["sparsification"] for m, c in shown.items()}, sparsification,
                            f"Sparsification, primary maps ({domain})")
        paths += [reliability, sparsification]
    return paths


# --------------------------------------------------------------------------- everything


def write_reports(folder: Path, scoreboard: Scoreboard, methods: list[str], refinement_methods: list[str],
                  unrefined: str, tracker, provenance: dict[str, Any] | None = None,
                  bootstrap: BootstrapSettings = BootstrapSettings(),
                  sections: Iterable[ReportSection] = (), refinement_note: str = "") -> dict[str, Any]:
    """Write every report file from the scoreboard and log them; returns headline figures.

    ``provenance``: what the report came from, shown in the HTML report: ``run ids`` (``RunIds`` as a dict),
    ``inputs`` (``methods.needed_artifacts``: declared to W&B as the run's inputs) and ``config``. The
    report files are logged as one W&B artifact (``lineage.evaluation_artifact``). ``bootstrap``: the
    replicates and seed of every interval. ``sections``: what another part of the stage added to the
    folder (``ReportSection``: e.g. the simulated clicks), shown in summary.md and index.html; its files
    are recorded in the digest and the artifact with the others (they must exist). ``refinement_note``:
    a line for refinement.md (which refinement gate was applied)."""
    sections = list(sections)
    per_mask = pd.DataFrame(scoreboard.rows)
    summary = summary_frame(scoreboard, methods, refinement_methods, bootstrap)
    mask_quality = mask_quality_frame(per_mask, methods, scoreboard.unseen_groups, DomainResampler(bootstrap))
    reliability, sparsification, curves_by_domain = curve_frames(scoreboard)
    evaluated = set(summary["method"])
    baselines = [m for m in (unrefined, "map_head") if m in evaluated]
    variants = [m for m in refinement_methods if m in evaluated]
    refinement = refinement_frame(summary, baselines, variants, unrefined) if variants else pd.DataFrame()
    refinement_md = refinement_markdown(refinement, unrefined, refinement_note)

    atomic_write_csv(folder / "per_mask.csv", per_mask)
    # The seen / unseen aggregates are rows of summary_by_domain.csv (after the groups), so
    # summary_overall.csv keeps one row per (method, map).
    overall = summary["domain"] == OVERALL
    atomic_write_csv(folder / "summary_by_domain.csv", summary[~overall])
    atomic_write_csv(folder / "summary_overall.csv", summary[overall])
    atomic_write_csv(folder / "mask_quality.csv", mask_quality)
    atomic_write_csv(folder / "reliability_bins.csv", reliability)
    atomic_write_csv(folder / "sparsification_curves.csv", sparsification)
    atomic_write_csv(folder / "refinement.csv", refinement)
    atomic_write_text(folder / "refinement.md", refinement_md + "\n")
    strategies = [m for m in methods if m not in refinement_methods]
    # The seen / unseen aggregates get no figures of their own (their groups do): figures are the
    # slowest part of the reports; their curves are in the CSVs.
    plots = write_curve_plots(folder, {domain: curves for domain, curves in curves_by_domain.items()
                                       if domain not in (SEEN, UNSEEN)}, strategies)
    panels = sorted((folder / QUALITATIVE_DIR).glob("*/*.png"))
    figures = [path.relative_to(folder).as_posix() for path in [*plots, *panels]]
    atomic_write_text(folder / SUMMARY_MARKDOWN,
                      summary_markdown(summary, refinement, refinement_md, methods, len(scoreboard.done),
                                       len(per_mask), scoreboard.ece_bins, counts=domain_counts(per_mask),
                                       figures=figures, mask_quality=mask_quality,
                                       bootstrap_samples=bootstrap.samples, sections=sections))
    atomic_write_text(folder / HTML_REPORT, html_report(folder, SUMMARY_MARKDOWN, HTML_TABLES, QUALITATIVE_DIR,
                                                        provenance or {}, sections=sections))
    written = [*CSV_FILES, "refinement.md", SUMMARY_MARKDOWN, HTML_REPORT, *(path.name for path in plots)]
    written += [name for section in sections for name in section.written if name not in written]
    atomic_write_json(folder / DIGEST_FILE, {name: file_md5(folder / name) for name in written})

    provenance = provenance or {}
    laplace_target = provenance.get("config", {}).get("laplace", {}).get("target", "head")
    for name, kind in evaluation_model_inputs(provenance.get("inputs", []), provenance.get("run ids", {}),
                                              laplace_target):
        tracker.use_artifact(name, kind)
    name, kind = evaluation_artifact(file_label(folder.name))
    tracker.log_artifact([folder / file for file in written] + panels, name=name, type=kind, root=folder)
    tracker.log_table("eval/summary_overall", summary[overall])
    tracker.log_table("eval/summary_by_domain", summary[~overall])
    if not mask_quality.empty:
        tracker.log_table("eval/mask_quality", mask_quality)
    tracker.log_table("eval/per_mask", per_mask)
    if not refinement.empty:
        tracker.log_table("eval/refinement", refinement)
    for path in [*plots, *panels]:
        tracker.log_image(f"eval/{path.relative_to(folder).with_suffix('').as_posix()}", path)

    figures: dict[str, Any] = {"report_dir": str(folder)}
    for domain, suffix in ((OVERALL, ""), *((d, f"_{d}") for d in AGGREGATES if d != OVERALL)):
        rows = summary[(summary["domain"] == domain) & summary["is_primary"]].set_index("method")
        for method in methods:
            if method in rows.index:
                figures[f"{method}/mean_iou{suffix}"] = round(float(rows.at[method, "mean_iou"]), 4)
                figures[f"{method}/auroc{suffix}"] = round(float(rows.at[method, "auroc"]), 4)
    return figures
