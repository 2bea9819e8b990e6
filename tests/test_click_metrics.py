"""The simulated clicks' outputs (issue #19): NoC, IoU after k clicks, the click-or-stop signal, the
paired policy comparison, the files ``write_click_reports`` writes and the section it adds to the
evaluation report. Synthetic traces built here (the trace contract of the simulation); no pipeline
fixture."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from modules.core.fileio import read_json
from modules.core.tracking import NullTracker
from modules.evaluation import reports
from modules.evaluation.html_report import HTML_REPORT, ReportSection, figure_anchor
from modules.evaluation.intervals import BootstrapSettings
from modules.evaluation.samples import LabelledSample
from modules.evaluation.scoreboard import Scoreboard
from modules.interactive import click_metrics
from modules.interactive.click_metrics import (ClickTraceError, check_trace, click_tables, clicks_to_reach,
                                               policy_comparison, stop_signal_frame, write_click_reports)
from modules.scoring.entropy import binary_entropy
from modules.uncertainty.strategies import StrategyOutput
from tests.test_uncertainty import disc_ground_truth, make_sample

BOOTSTRAP = BootstrapSettings(samples=200, seed=0)


def trace_of(curves: dict[tuple, np.ndarray], unseen_groups=(), quality=None, predicted_iou=None) -> pd.DataFrame:
    """A trace from ``{(safe_id, group, policy[, draw]): IoU after clicks 1..K}`` (draw default 0);
    ``quality`` / ``predicted_iou``: functions of the IoU (default: ``1 - iou`` and the IoU)."""
    rows = []
    for (safe_id, group, policy, *draw), ious in curves.items():
        for clicks, iou in enumerate(ious, start=1):
            rows.append({"safe_id": safe_id, "group": group, "unseen": group in unseen_groups, "policy": policy,
                         "draw": draw[0] if draw else 0, "clicks": clicks, "iou": float(iou),
                         "quality": (quality or (lambda v: 1.0 - v))(float(iou)),
                         "predicted_iou": (predicted_iou or (lambda v: v))(float(iou)),
                         "x": 3 * clicks, "y": 2 * clicks, "label": clicks % 2})
    return pd.DataFrame(rows)


def random_curves(n_images: int, policies: dict[str, float], groups: tuple[str, ...], max_clicks: int = 20,
                  seed: int = 0) -> dict[tuple[str, str, str], np.ndarray]:
    """Rising IoU curves: ``policies`` maps each policy to its rate of approach to 1."""
    rng = np.random.default_rng(seed)
    curves = {}
    for group in groups:
        for index in range(n_images):
            start = rng.uniform(0.3, 0.7)
            for policy, rate in policies.items():
                steps = np.arange(max_clicks)
                noise = rng.normal(0.0, 0.03, max_clicks)
                curves[(f"{group}{index}", group, policy)] = np.clip(
                    start + (1 - start) * (1 - np.exp(-rate * rng.uniform(0.5, 1.5) * steps)) + noise, 0, 1)
    return curves


def test_noc_is_the_first_click_reaching_the_threshold_and_the_cap_where_never():
    reaches_at_3 = np.array([0.5, 0.7, 0.86, 0.8, 0.91, 0.95])  # dips after reaching: still 3
    never = np.array([0.2, 0.3, 0.4, 0.5, 0.6, 0.84])
    needed, reached = clicks_to_reach(np.stack([reaches_at_3, never]), 0.85)
    assert needed.tolist() == [3, 6] and reached.tolist() == [True, False]
    trace = trace_of({("a", "g", "bald"): reaches_at_3, ("b", "g", "bald"): never})
    _, _, noc = click_tables(trace, 6, BOOTSTRAP)
    row = noc[noc["domain"] == "overall"].iloc[0]
    assert row["noc_85"] == pytest.approx(4.5) and row["never_85"] == 1
    assert row["noc_90"] == pytest.approx((5 + 6) / 2) and row["never_90"] == 1
    assert row["noc_85_lo"] == pytest.approx(3.0) and row["noc_85_hi"] == pytest.approx(6.0)


def test_iou_after_k_clicks_means_with_intervals_that_contain_them_and_shrink_with_more_images():
    curves = random_curves(40, {"bald": 0.3}, ("g",), max_clicks=12)
    trace = trace_of(curves)
    clicks, curve, _ = click_tables(trace, 12, BOOTSTRAP)
    row = clicks.iloc[0]
    stacked = np.stack(list(curves.values()))
    for k in (1, 3, 5, 10):
        assert row[f"iou_at_{k}"] == pytest.approx(stacked[:, k - 1].mean())
        assert row[f"iou_at_{k}_lo"] < row[f"iou_at_{k}"] < row[f"iou_at_{k}_hi"]
    assert "iou_at_20" not in clicks  # only the counts up to max_clicks
    assert list(clicks["domain"]) == ["g", "overall"]
    overall = curve[curve["domain"] == "overall"]
    assert overall["clicks"].tolist() == list(range(1, 13))
    assert overall["mean_iou"].to_numpy() == pytest.approx(stacked.mean(0))
    few = trace[trace["safe_id"].isin([f"g{i}" for i in range(8)])]
    many = pd.concat([few.assign(safe_id=few["safe_id"] + f"_{copy}") for copy in range(5)])  # same spread
    wide, narrow = (click_tables(rows, 12, BOOTSTRAP)[0].iloc[0] for rows in (few, many))
    assert narrow["n_images"] == 40 and wide["n_images"] == 8
    for k in (1, 5, 10):
        assert narrow[f"iou_at_{k}_hi"] - narrow[f"iou_at_{k}_lo"] < wide[f"iou_at_{k}_hi"] - wide[f"iou_at_{k}_lo"]


def test_stop_signal_auroc_is_one_when_the_uncertainty_separates_and_zero_when_reversed():
    curves = random_curves(6, {"bald": 0.3}, ("g",))
    separating = stop_signal_frame(trace_of(curves), 20, BOOTSTRAP).iloc[0]
    assert 0 < separating["n_positive"] < separating["n_rows"] == 6 * 20
    assert separating["auroc_uncertainty"] == 1.0 and separating["auroc_uncertainty_lo"] == 1.0
    reversed_ = stop_signal_frame(trace_of(curves, quality=lambda v: v, predicted_iou=lambda v: -v), 20,
                                  BOOTSTRAP).iloc[0]
    assert reversed_["auroc_uncertainty"] == 0.0 and reversed_["auroc_sam_predicted_iou"] == 0.0
    assert reversed_["auroc_difference"] == 0.0


def test_bald_against_random_is_paired_over_images():
    curves = random_curves(12, {"bald": 0.5, "random": 0.1, "entropy": 0.5}, ("g",))
    for (safe_id, group, policy), ious in list(curves.items()):
        if policy == "entropy":  # entropy = bald, one click later: IoU@5 lower, NoC@85 one more where reached
            curves[(safe_id, group, policy)] = np.r_[curves[(safe_id, group, "bald")][0],
                                                     curves[(safe_id, group, "bald")][:-1]]
    comparison = policy_comparison(trace_of(curves), bootstrap=BOOTSTRAP)
    assert set(comparison["domain"]) == {"g", "overall"}
    comparison = comparison[comparison["domain"] == "overall"].set_index(["baseline", "metric"])
    random_noc = comparison.loc[("random", "noc_85")]
    assert random_noc["difference"] < random_noc["difference_hi"] < 0 and random_noc["verdict"] == "bald better"
    entropy_iou = comparison.loc[("entropy", "iou_at_5")]
    bald = np.stack([v for k, v in curves.items() if k[2] == "bald"])
    entropy = np.stack([v for k, v in curves.items() if k[2] == "entropy"])
    assert entropy_iou["difference"] == pytest.approx((bald[:, 4] - entropy[:, 4]).mean())
    assert entropy_iou["n_images"] == 12


def test_a_policy_with_several_draws_counts_once_per_image_with_the_mean_of_its_draws():
    """Image a: random's two draws reach 0.85 at clicks 2 and never (per image NoC (2 + 4) / 2 = 3,
    half a "never"); image b: one draw (NoC 1). Every table averages the draws within an image first,
    so n and the intervals count images, not runs; the stop signal scores every run's rows."""
    draw0, draw1 = np.array([0.5, 0.9, 0.9, 0.95]), np.array([0.3, 0.4, 0.5, 0.6])
    bald_a, bald_b = np.array([0.5, 0.6, 0.9, 0.9]), np.array([0.9, 0.9, 0.9, 0.9])
    trace = trace_of({("a", "g", "bald"): bald_a, ("a", "g", "random", 0): draw0, ("a", "g", "random", 1): draw1,
                      ("b", "g", "bald"): bald_b, ("b", "g", "random", 0): np.full(4, 0.88)})
    clicks, curve, noc = click_tables(trace, 4, BOOTSTRAP)
    random_clicks = clicks[(clicks["policy"] == "random") & (clicks["domain"] == "overall")].iloc[0]
    assert random_clicks["n_images"] == 2 and random_clicks["draws"] == 2
    assert random_clicks["iou_at_3"] == pytest.approx(((0.9 + 0.5) / 2 + 0.88) / 2)
    random_curve = curve[(curve["policy"] == "random") & (curve["domain"] == "overall")]
    assert random_curve["mean_iou"].to_numpy() == pytest.approx(((draw0 + draw1) / 2 + 0.88) / 2)
    random_noc = noc[(noc["policy"] == "random") & (noc["domain"] == "overall")].iloc[0]
    assert random_noc["noc_85"] == pytest.approx((3 + 1) / 2) and random_noc["never_85"] == pytest.approx(0.5)
    bald_noc = noc[(noc["policy"] == "bald") & (noc["domain"] == "overall")].iloc[0]
    assert bald_noc["noc_85"] == pytest.approx((3 + 1) / 2) and bald_noc["never_85"] == 0

    comparison = policy_comparison(trace, bootstrap=BOOTSTRAP, pairs=[("bald", "random")])
    row = comparison[(comparison["domain"] == "overall") & (comparison["metric"] == "noc_85")].iloc[0]
    assert row["n_images"] == 2 and row["difference"] == pytest.approx(0.0)
    row = comparison[(comparison["domain"] == "overall") & (comparison["metric"] == "iou_at_5")]
    assert row.empty  # four clicks: IoU@5 is not defined
    stop = stop_signal_frame(trace, 4, BOOTSTRAP)
    assert stop[(stop["policy"] == "random") & (stop["domain"] == "overall")].iloc[0]["n_rows"] == 3 * 4


def test_a_trace_missing_a_click_is_one_line_naming_the_image_and_policy():
    trace = trace_of({("a", "g", "bald"): np.linspace(0.5, 0.9, 5), ("a", "g", "random", 1): np.linspace(0, 1, 5)})
    with pytest.raises(ClickTraceError, match=r"a / bald \(draw 0\) has 4 rows .* clicks 1 \.\. 5"):
        check_trace(trace[(trace["clicks"] != 4) | (trace["policy"] != "bald")], 5)
    with pytest.raises(ClickTraceError, match=r"a / random \(draw 1\) has 6 rows for 5 distinct"):
        check_trace(pd.concat([trace, trace.tail(1)]), 5)
    with pytest.raises(ClickTraceError, match="missing column"):
        check_trace(trace.drop(columns=["quality"]), 5)


class TableTracker(NullTracker):
    def __init__(self):
        self.tables, self.images = {}, []

    def log_table(self, name, frame):
        self.tables[name] = frame

    def log_image(self, name, path):
        self.images.append(name)


@pytest.fixture(scope="module")
def click_report(tmp_path_factory):
    """``write_click_reports`` on two seen groups and one unseen, three policies; bald's IoU@5 differs
    from random's by float noise only (a difference that must not print as a negative zero)."""
    folder = tmp_path_factory.mktemp("eval") / "run_v1"
    curves = random_curves(5, {"oracle": 0.5, "bald": 0.3, "random": 0.1}, ("forest", "street", "thin"))
    for (safe_id, group, policy) in list(curves):
        if policy == "random":
            curves[(safe_id, group, "random")][4] = 0.1 + 0.2
            curves[(safe_id, group, "bald")][4] = 0.3
            curves[(safe_id, group, "random", 1)] = curves[(safe_id, group, "random")].copy()
    tracker = TableTracker()
    report = write_click_reports(folder, trace_of(curves, unseen_groups=("thin",)), 20, BOOTSTRAP.samples,
                                 BOOTSTRAP.seed, tracker)
    return folder, report, tracker


def test_click_reports_cover_every_domain_and_never_print_negative_zero(click_report):
    folder, report, tracker = click_report
    expected = ["forest", "street", "thin", "seen", "unseen", "overall"]
    for name in ("clicks.csv", "noc.csv", "stop_signal.csv"):
        frame = pd.read_csv(folder / name)
        assert list(dict.fromkeys(frame["domain"])) == expected
        assert set(frame["policy"]) == {"oracle", "bald", "random"}
        assert frame.loc[frame["domain"] == "thin", "domain_kind"].eq("unseen").all()
        assert f"eval/{name[:-4]}" in tracker.tables
    comparison = pd.read_csv(folder / "click_comparison.csv")
    noise = comparison[(comparison["metric"] == "iou_at_5") & (comparison["baseline"] == "random")]
    assert (noise["difference"] == 0.0).all()  # 0.3 - (0.1 + 0.2) = -5.6e-17, written as 0
    for path in report.csvs:
        text = path.read_text()
        assert "-0.0000" not in text and not re.search(r"-0\.0(,|$)", text, re.M), path.name
    assert "-0.000" not in report.markdown


def test_click_figure_and_markdown_name_every_file(click_report):
    folder, report, tracker = click_report
    assert [path.name for path in report.figures] == ["clicks_iou.png"]
    with Image.open(report.figures[0]) as image:
        width, height = image.size
    assert width > 2.5 * height  # three panels side by side: seen, unseen, overall
    assert tracker.images == ["eval/clicks_iou"]
    for path in [*report.csvs, *report.figures]:
        assert f"]({path.name})" in report.markdown
    for domain in ("#### seen (n=10 images)", "#### unseen (n=5 images)", "#### overall (n=15 images)"):
        assert domain in report.markdown
    assert "| oracle | " in report.markdown and "bald - random" in report.markdown
    assert "`random` runs 2 times per image" in report.markdown and "`bald` runs" not in report.markdown


def _outputs(sample) -> dict[str, StrategyOutput]:
    prob = torch.from_numpy(np.asarray(sample.cache_entry.logits, dtype=np.float32)).sigmoid()
    return {"raw_sam": StrategyOutput(prob, {"entropy": binary_entropy(prob)}, "entropy")}


def test_the_evaluation_report_gains_the_click_section(tmp_path, click_report):
    source, report, _ = click_report
    folder = tmp_path / "run_v1"
    folder.mkdir()
    for path in [*report.csvs, *report.figures]:
        (folder / path.name).write_bytes(path.read_bytes())
    section = report.section()  # report-relative names: the same in the copy
    assert section.figures == ("clicks_iou.png",) and "clicks_curve.csv" in section.files
    board = Scoreboard(ece_bins=10, device=torch.device("cpu"))
    sample = dataclasses.replace(make_sample("f1", num_sets=1), group="forest")
    board.score_sample(LabelledSample(sample, disc_ground_truth()), _outputs(sample))
    reports.write_reports(folder, board, ["raw_sam"], [], "raw_sam", NullTracker(), sections=[section])

    summary = (folder / reports.SUMMARY_MARKDOWN).read_text()
    body = summary.split(f"## {click_metrics.SECTION_TITLE}\n\n")[1]
    assert body.startswith(report.markdown.strip()[:200]) and body.index("## Files") > 0
    assert "[clicks.csv](clicks.csv)" in summary.split("## Files")[1]
    page = (folder / HTML_REPORT).read_text()
    assert page.count(f'<figure id="{figure_anchor("clicks_iou.png")}">') == 1  # once, under the section
    assert page.index(f"<h3>{click_metrics.SECTION_TITLE}</h3>") < page.index(f'id="{figure_anchor("clicks_iou.png")}"')
    assert f'href="#{figure_anchor("clicks_iou.png")}"' in page and "stop_signal.csv</a>)" in page
    assert {"clicks.csv", "clicks_iou.png", "clicks_curve.csv"} <= set(read_json(folder / reports.DIGEST_FILE))
    assert reports.reports_complete(folder)
    (folder / "noc.csv").write_text("changed\n")
    assert not reports.reports_complete(folder)  # the section's files are part of the recorded report


def test_a_section_adds_its_text_and_figure_links_to_the_summary_and_nothing_else():
    board = Scoreboard(ece_bins=10, device=torch.device("cpu"))
    sample = dataclasses.replace(make_sample("f1", num_sets=1), group="forest")
    board.score_sample(LabelledSample(sample, disc_ground_truth()), _outputs(sample))
    summary = reports.summary_frame(board, ["raw_sam"], [], BootstrapSettings(samples=20))
    plain = reports.summary_markdown(summary, summary.iloc[0:0], "", ["raw_sam"], 1, 1, 10, figures=["a.png"])
    assert reports.summary_markdown(summary, summary.iloc[0:0], "", ["raw_sam"], 1, 1, 10, figures=["a.png"],
                                    sections=[]) == plain
    added = reports.summary_markdown(summary, summary.iloc[0:0], "", ["raw_sam"], 1, 1, 10, figures=["a.png"],
                                     sections=[ReportSection("Extra", "Text.", figures=("b.png",))])
    assert added.replace("## Extra\n\nText.\n\n", "").replace("- [b.png](b.png)\n", "") == plain
