"""The evaluation's report files as people read them (issue #23): ``summary.md`` (counts per domain,
best values marked, intervals, no negative zero, figure links) and the self-contained ``index.html``,
rendered in headless Chromium where it is installed (``.ci/run`` installs it).

The reports are written by ``reports.write_reports`` from a real ``Scoreboard`` of two domains and
three methods on synthetic samples (no pipeline fixture: seconds, not minutes).
"""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from modules.core.tracking import NullTracker
from modules.evaluation import reports
from modules.evaluation.html_report import (HTML_REPORT, JPEG_ABOVE_BYTES, embedded_image, figure_anchor,
                                            markdown_to_html)
from modules.evaluation.samples import LabelledSample
from modules.evaluation.scoreboard import Scoreboard
from modules.scoring.entropy import binary_entropy
from modules.uncertainty.strategies import StrategyOutput
from tests.test_uncertainty import disc_ground_truth, make_sample

METHODS = ["raw_sam", "tta", "prompt_perturbation_oracle"]
PANEL_METHODS = ["tta"]


def _outputs(sample, seed: int) -> dict[str, StrategyOutput]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.from_numpy(np.asarray(sample.cache_entry.logits, dtype=np.float32)).sigmoid()
    outputs = {}
    for index, method in enumerate(METHODS):
        prob = (base + 0.05 * index * torch.rand(base.shape, generator=generator)).clamp(0, 1)
        outputs[method] = StrategyOutput(prob, {"entropy": binary_entropy(prob)}, "entropy")
    return outputs


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report folder written by ``write_reports``: domains ``forest`` (one image, one prompt set) and
    ``street`` (one image, two prompt sets); panels of one method (figures are the slow part)."""
    folder = tmp_path_factory.mktemp("report") / "run_v1"
    folder.mkdir()
    board = Scoreboard(ece_bins=10, device=torch.device("cpu"))
    for seed, (safe_id, domain, prompt_sets) in enumerate([("f1", "forest", 1), ("s1", "street", 2)]):
        sample = dataclasses.replace(make_sample(safe_id, seed=seed, num_sets=prompt_sets), group=domain)
        labelled = LabelledSample(sample, disc_ground_truth())
        scored = board.score_sample(labelled, _outputs(sample, seed))
        reports.write_qualitative_panels(folder, labelled, scored, PANEL_METHODS, prompt_mode="points_and_box")
    provenance = {"run ids": {"head": "v1", "variance": "v1", "laplace": "v2", "fusion": "v1"},
                  "inputs": ["head", "laplace", "sam_checkpoint"],
                  "config": {"evaluation": {"ece_bins": 10}, "laplace": {"target": "head"}}}
    tracker = RecordingTracker()
    reports.write_reports(folder, board, METHODS, [], "raw_sam", tracker, provenance=provenance)
    return folder, board, tracker


class RecordingTracker(NullTracker):
    """The artifacts a stage's tracker is handed."""

    def __init__(self):
        self.logged, self.used = [], []

    def log_artifact(self, path, name, type, aliases=None, root=None):
        self.logged.append((name, type, sorted(Path(p).relative_to(root).as_posix() for p in path)))

    def use_artifact(self, name, type):
        self.used.append((name, type))


def test_summary_counts_marks_best_links_figures_and_never_prints_negative_zero(report):
    folder, board, _ = report
    text = (folder / "summary.md").read_text()
    assert "| forest | 1 | 1 |" in text and "| street | 1 | 2 |" in text and "| overall | 2 | 3 |" in text
    assert "-0.0000" not in text
    summary = pd.read_csv(folder / "summary_overall.csv")
    primary = summary[summary.is_primary].set_index("method")
    best_iou = max(("raw_sam", "tta"), key=lambda m: primary.at[m, "mean_iou"])
    iou_table = text.split("## IoU")[1].split("##")[0]
    rows = [line.split("|") for line in iou_table.splitlines() if line.startswith("| ") and "method" not in line]
    bold_rows = [row[1].strip() for row in rows if "**" in row[-2]]
    assert bold_rows == [best_iou]  # the overall column: the best non-oracle method only
    for name in ("reliability_forest.png", "sparsification_overall.png", "qualitative/tta/s1_0.png"):
        assert f"[{name}]({name})" in text and (folder / name).is_file()
    assert "[index.html](index.html)" in text


def test_summary_shows_intervals_where_the_tables_have_them(report):
    folder, board, _ = report
    summary = reports.summary_frame(board, METHODS, [])
    summary["ece_lo"], summary["ece_hi"] = summary["ece"] - 0.01, summary["ece"] + 0.02
    summary.loc[0, "ece"] = -1e-7  # rounds to zero: printed without a sign
    text = reports.summary_markdown(summary, summary.iloc[0:0], "", METHODS, 3, 27, 10)
    ece_table = text.split("## ECE")[1].split("##")[0]
    cells = re.findall(r"\| (\*{0,2}[0-9.]+ \[[0-9.-]+, [0-9.]+\]\*{0,2}) ", ece_table)
    assert len(cells) == 3 * 3  # every (method, domain) cell shows its interval
    assert "-0.0000" not in text and "0.0000 [" in text


def test_html_report_is_one_file_with_every_figure_embedded(report):
    folder, _, _ = report
    page = (folder / HTML_REPORT).read_text()
    figures = sorted(p.relative_to(folder).as_posix()
                     for p in [*folder.glob("*.png"), *folder.glob("qualitative/*/*.png")])
    # reliability and sparsification per domain and overall, and the panels
    assert len(figures) == 2 * 3 + 2 * len(PANEL_METHODS)
    sources = re.findall(r'<img alt="([^"]+)" src="data:image/(?:png|jpeg);base64,', page)
    assert sorted(sources) == figures
    assert not re.search(r'<img[^>]+src="(?!data:)', page)  # nothing loaded from outside the page
    for name in figures:
        assert f'id="{figure_anchor(name)}"' in page and f'href="#{figure_anchor(name)}"' in page
    assert "<h3>tta</h3>" in page and "<h4>tta: forest</h4>" in page and "<h4>tta: street</h4>" in page
    assert "run ids:" in page and "head: v1" in page and "ece_bins: 10" in page
    assert "summary_by_domain.csv" in page and "<strong>" in page
    assert "inputs:" in page
    assert reports.reports_complete(folder)
    (folder / HTML_REPORT).write_text(page.replace("<h2>", "<h2>changed", 1))
    assert not reports.reports_complete(folder)  # the page is part of the recorded report
    (folder / HTML_REPORT).write_text(page)


def test_markdown_subset_renders_tables_lists_and_links():
    page = markdown_to_html("# T\n\nA **b** `c`.\n\n| m | x |\n|---|---|\n| a | **1** |\n\n- [f.png](f.png)\n",
                            ["f.png"])
    assert page == ("<h1>T</h1>\n<p>A <strong>b</strong> <code>c</code>.</p>\n"
                    '<div class="scroll"><table><thead><tr><th>m</th><th>x</th></tr></thead><tbody>'
                    "<tr><td>a</td><td><strong>1</strong></td></tr></tbody></table></div>\n"
                    f'<ul><li><a href="#{figure_anchor("f.png")}">f.png</a></li></ul>')


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("chromium not installed: .ci/run installs the Debian package `chromium` where apt-get works")


def test_html_report_renders_in_headless_chromium_with_every_image_loaded(report, tmp_path):
    chromium = _chromium()
    folder, _, _ = report
    page = (folder / HTML_REPORT).read_text()
    count_script = ("<script>window.addEventListener('load', () => { const images = [...document.images]; "
                    "document.title = 'loaded ' + images.filter(i => i.complete && i.naturalWidth > 0).length "
                    "+ ' of ' + images.length; });</script>")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", count_script + "</body>"))
    common = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120,
                         env=env)
    images = len(re.findall(r"<img ", page))
    assert f"<title>loaded {images} of {images}</title>" in dom.stdout, dom.stderr[-2000:]
    screenshot = tmp_path / "page.png"
    subprocess.run([*common, f"--screenshot={screenshot}", "--window-size=1280,1600", (folder / HTML_REPORT).as_uri()],
                   capture_output=True, text=True, timeout=120, env=env)
    with Image.open(screenshot) as shot:
        pixels = np.asarray(shot.convert("L"))
    assert pixels.shape == (1600, 1280)
    assert (pixels < 128).mean() > 0.005 and pixels.std() > 10  # text and tables drawn, not a blank page


def test_the_report_is_one_w_and_b_artifact_and_declares_the_models_it_read(report):
    folder, _, tracker = report
    ((name, kind, files),) = tracker.logged
    recorded = reports.read_json(folder / reports.DIGEST_FILE)
    panels = sorted(p.relative_to(folder).as_posix() for p in folder.glob("qualitative/*/*.png"))
    assert (name, kind) == ("evaluation-run_v1", "evaluation") and files == sorted([*recorded, *panels])
    assert HTML_REPORT in files and "reports.md5.json" not in files
    assert tracker.used == [("head-run_v1", "model"), ("laplace-head-run_v2", "laplace")]


def test_methods_share_one_colour_scale_per_map_kind():
    low, high, other = torch.full((4, 4), 0.1), torch.full((4, 4), 0.3), torch.full((4, 4), 5.0)
    low[0, 0], high[0, 0] = 0.05, 0.6
    ranges = reports.shared_colour_ranges({"a": ("entropy", low), "b": ("entropy", high), "c": ("std", other)})
    assert ranges == {"entropy": (pytest.approx(0.05), pytest.approx(0.6)), "std": (5.0, 5.0 + 1e-6)}


def test_large_figures_are_embedded_as_jpeg_small_ones_as_png(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noisy.png")
    Image.fromarray(np.full((400, 600, 3), 200, np.uint8)).save(tmp_path / "flat.png")
    assert (tmp_path / "noisy.png").stat().st_size > JPEG_ABOVE_BYTES
    mime, data = embedded_image(tmp_path / "noisy.png")
    assert mime == "image/jpeg" and len(data) < (tmp_path / "noisy.png").stat().st_size
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (600, 400)
    assert embedded_image(tmp_path / "flat.png") == ("image/png", (tmp_path / "flat.png").read_bytes())


def test_values_equal_to_the_digits_shown_are_all_best():
    table = pd.DataFrame({"method": ["a", "b", "oracle"], "x": [0.00121, 0.00118, 0.0001]})
    assert reports.best_methods(table, higher_better=False, candidates=["a", "b"]) == {"x": {"a", "b"}}
