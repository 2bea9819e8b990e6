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
from modules.evaluation.html_report import HTML_REPORT, html_report
from modules.evaluation.methods import ORACLE_METHODS
from modules.evaluation.samples import LabelledSample
from modules.evaluation.scoreboard import OVERALL, SEGMENTATION_KEYS, Scoreboard, ScoredMethod
from modules.scoring import metrics
from modules.scoring.plots import plot_qualitative_panel, plot_reliability_diagram, plot_sparsification

QUALITATIVE_DIR = "qualitative"
SUMMARY_MARKDOWN = "summary.md"
DIGEST_FILE = "reports.md5.json"
CSV_FILES = ("per_mask.csv", "summary_by_domain.csv", "summary_overall.csv", "reliability_bins.csv",
             "sparsification_curves.csv", "refinement.csv")
#: summary.md: (column of the summary tables, heading, higher is better?).
KEY_METRICS = (
    ("mean_iou", "IoU (mean over masks)", True),
    ("ece", "ECE", False),
    ("nll", "NLL (nats / pixel)", False),
    ("auroc", "AUROC of error detection (primary map)", True),
    ("ause", "AUSE (primary map)", False),
    ("mask_spearman", "Spearman(mean uncertainty, 1 - IoU) across masks (primary map)", True),
)
#: The tables the HTML report shows in full (besides summary.md's), with their headings.
HTML_TABLES = (("summary_overall.csv", "All metrics, every map, all domains together"),
               ("summary_by_domain.csv", "All metrics, every map, per domain"),
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


def summary_frame(scoreboard: Scoreboard, methods: list[str], refinement_methods: list[str]) -> pd.DataFrame:
    """One row per (method, map, domain): streaming metrics + per-mask means + mask-level Spearman."""
    masks = pd.DataFrame(scoreboard.rows)
    entries = []
    for (method, map_name, domain), accumulator in scoreboard.accumulators.items():
        selected = masks[masks["method"] == method]
        if domain != OVERALL:
            selected = selected[selected["group"] == domain]
        entry = {"method": method, "kind": "refinement" if method in refinement_methods else "strategy",
                 "map": map_name, "is_primary": scoreboard.primary_maps.get(method) == map_name,
                 "domain": domain, "n_masks": len(selected), "ece_bins": scoreboard.ece_bins,
                 **accumulator.compute()}
        entry["mask_spearman"] = _mask_spearman(selected[f"mean_{map_name}"], 1.0 - selected["iou"])
        entry.update({f"mean_{key}": float(selected[key].mean()) for key in SEGMENTATION_KEYS})
        entries.append(entry)
    frame = pd.DataFrame(entries)
    order = {method: index for index, method in enumerate(methods)}
    frame["_method_order"] = frame["method"].map(order)
    frame["_domain_order"] = frame["domain"] == OVERALL
    frame = frame.sort_values(["_domain_order", "domain", "_method_order", "is_primary", "map"],
                              ascending=[True, True, True, False, True])
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
               "auroc"]
    frame = primary[columns].copy()
    reference = frame[frame["method"] == unrefined].set_index("domain")["mean_iou"]
    frame[f"delta_iou_vs_{unrefined}"] = frame["mean_iou"] - frame["domain"].map(reference)
    order = {method: index for index, method in enumerate([*baselines, *variants])}
    frame["_order"] = frame["method"].map(order)
    frame["_overall"] = frame["domain"] == OVERALL
    return frame.sort_values(["_overall", "domain", "_order"]).drop(columns=["_order", "_overall"]).reset_index(drop=True)


def _format(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        text = f"{value:.4f}"
        return text[1:] if text == "-0.0000" else text  # a value that rounds to zero has no sign
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of a small frame (index ignored), floats with 4 decimals."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_format(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def method_by_domain(summary: pd.DataFrame, column: str, methods: list[str]) -> pd.DataFrame:
    """``methods`` x (domains, then overall) table of one column over the primary-map rows."""
    primary = summary[summary["is_primary"]]
    table = primary.pivot_table(index="method", columns="domain", values=column, aggfunc="first", dropna=False)
    domains = sorted(d for d in table.columns if d != OVERALL) + ([OVERALL] if OVERALL in table.columns else [])
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
    return markdown_table(shown)


def figure_links(figures: Iterable[str]) -> list[str]:
    """Markdown list items linking report-relative figure paths."""
    return [f"- [{name}]({name})" for name in figures]


def summary_markdown(summary: pd.DataFrame, refinement: pd.DataFrame, refinement_md: str, methods: list[str],
                     n_samples: int, n_masks: int, ece_bins: int, counts: pd.DataFrame | None = None,
                     figures: Iterable[str] = ()) -> str:
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
    lines += ["In each table the best value per domain is in **bold** (oracle ablations excluded)"
              + ("; `value [lo, hi]`: the value and its interval" if any(c.endswith("_lo") for c in summary.columns)
                 else "") + ".", ""]
    for column, heading, higher_better in KEY_METRICS:
        lines += [f"## {heading} ({'higher' if higher_better else 'lower'} is better)", "",
                  metric_markdown(summary[summary["kind"] == "strategy"], column, strategies, higher_better), ""]
    if not refinement.empty:
        lines += ["## Dense embedding fusion refinement", "", refinement_md, ""]
    figures = list(figures)
    lines += ["## Files", "", "Tables: [per_mask.csv](per_mask.csv), [summary_by_domain.csv](summary_by_domain.csv), "
              "[summary_overall.csv](summary_overall.csv), [refinement.csv](refinement.csv); everything in one "
              f"page: [{HTML_REPORT}]({HTML_REPORT}).", ""]
    if figures:
        lines += ["Figures:", "", *figure_links(figures), ""]
    return "\n".join(lines)


def refinement_markdown(refinement: pd.DataFrame, unrefined: str) -> str:
    if refinement.empty:
        return "Refinement not evaluated (evaluation.refinement is false)."
    methods = list(dict.fromkeys(refinement["method"]))
    iou = refinement.pivot_table(index="method", columns="domain", values="mean_iou", aggfunc="first")
    domains = sorted(d for d in iou.columns if d != OVERALL) + ([OVERALL] if OVERALL in iou.columns else [])
    iou = iou.reindex(index=methods, columns=domains).reset_index()
    overall = refinement[refinement["domain"] == OVERALL].drop(columns=["domain"])
    return "\n".join([
        "Mean IoU per domain. `refined`: fusion with the configured uncertainty source on SAM's first pass; "
        "`refined_constant`: the same with a constant uncertainty map (ablation); `refined_oracle_mask`: the "
        "ground-truth mask as the mask prompt (oracle ablation).", "",
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
                  unrefined: str, tracker, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every report file from the scoreboard and log them; returns headline figures.

    ``provenance``: what the report came from, shown in the HTML report: ``run ids`` (``RunIds`` as a dict),
    ``inputs`` (``methods.needed_artifacts``: declared to W&B as the run's inputs) and ``config``. The
    report files are logged as one W&B artifact (``lineage.evaluation_artifact``)."""
    per_mask = pd.DataFrame(scoreboard.rows)
    summary = summary_frame(scoreboard, methods, refinement_methods)
    reliability, sparsification, curves_by_domain = curve_frames(scoreboard)
    evaluated = set(summary["method"])
    baselines = [m for m in (unrefined, "map_head") if m in evaluated]
    variants = [m for m in refinement_methods if m in evaluated]
    refinement = refinement_frame(summary, baselines, variants, unrefined) if variants else pd.DataFrame()
    refinement_md = refinement_markdown(refinement, unrefined)

    atomic_write_csv(folder / "per_mask.csv", per_mask)
    atomic_write_csv(folder / "summary_by_domain.csv", summary[summary["domain"] != OVERALL])
    atomic_write_csv(folder / "summary_overall.csv", summary[summary["domain"] == OVERALL])
    atomic_write_csv(folder / "reliability_bins.csv", reliability)
    atomic_write_csv(folder / "sparsification_curves.csv", sparsification)
    atomic_write_csv(folder / "refinement.csv", refinement)
    atomic_write_text(folder / "refinement.md", refinement_md + "\n")
    strategies = [m for m in methods if m not in refinement_methods]
    plots = write_curve_plots(folder, curves_by_domain, strategies)
    panels = sorted((folder / QUALITATIVE_DIR).glob("*/*.png"))
    figures = [path.relative_to(folder).as_posix() for path in [*plots, *panels]]
    atomic_write_text(folder / SUMMARY_MARKDOWN,
                      summary_markdown(summary, refinement, refinement_md, methods, len(scoreboard.done),
                                       len(per_mask), scoreboard.ece_bins, counts=domain_counts(per_mask),
                                       figures=figures))
    atomic_write_text(folder / HTML_REPORT, html_report(folder, SUMMARY_MARKDOWN, HTML_TABLES, QUALITATIVE_DIR,
                                                        provenance or {}))
    written = [*CSV_FILES, "refinement.md", SUMMARY_MARKDOWN, HTML_REPORT, *(path.name for path in plots)]
    atomic_write_json(folder / DIGEST_FILE, {name: file_md5(folder / name) for name in written})

    provenance = provenance or {}
    laplace_target = provenance.get("config", {}).get("laplace", {}).get("target", "head")
    for name, kind in evaluation_model_inputs(provenance.get("inputs", []), provenance.get("run ids", {}),
                                              laplace_target):
        tracker.use_artifact(name, kind)
    name, kind = evaluation_artifact(file_label(folder.name))
    tracker.log_artifact([folder / file for file in written] + panels, name=name, type=kind, root=folder)
    tracker.log_table("eval/summary_overall", summary[summary["domain"] == OVERALL])
    tracker.log_table("eval/summary_by_domain", summary[summary["domain"] != OVERALL])
    tracker.log_table("eval/per_mask", per_mask)
    if not refinement.empty:
        tracker.log_table("eval/refinement", refinement)
    for path in [*plots, *panels]:
        tracker.log_image(f"eval/{path.relative_to(folder).with_suffix('').as_posix()}", path)

    overall = summary[(summary["domain"] == OVERALL) & summary["is_primary"]].set_index("method")
    figures: dict[str, Any] = {"report_dir": str(folder)}
    for method in methods:
        if method in overall.index:
            figures[f"{method}/mean_iou"] = round(float(overall.at[method, "mean_iou"]), 4)
            figures[f"{method}/auroc"] = round(float(overall.at[method, "auroc"]), 4)
    return figures
