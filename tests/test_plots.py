"""Tests of modules.scoring.plots: each figure is a readable PNG of the expected size, written atomically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection

from modules.scoring import metrics
from modules.scoring import plots
from modules.scoring.plots import PlotInputError
from modules.stages.visualize_sanity import sanity_figsize


def _open_png(path):
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        image.load()
        return image.format, image.size


def _only_file_is(folder, name):
    assert sorted(p.name for p in folder.iterdir()) == [name]  # no temporary files left behind


def _calibration_and_sparsification(seed: int):
    generator = torch.Generator().manual_seed(seed)
    p = torch.rand(32, 32, generator=generator, dtype=torch.float64)
    y = torch.rand(32, 32, generator=generator, dtype=torch.float64) < p
    u = (y.double() - p).abs() + 0.1 * torch.rand(32, 32, generator=generator, dtype=torch.float64)
    accumulator = metrics.UncertaintyAccumulator((0.0, 1.1))
    accumulator.update(p, y, u)
    return accumulator.curves()


def test_reliability_diagram_from_accumulator_output(tmp_path):
    curves = {name: _calibration_and_sparsification(seed)["reliability"]
              for seed, name in enumerate(["tta", "laplace"])}
    path = tmp_path / "reliability.png"
    plots.plot_reliability_diagram(curves, path, "domain A")
    image_format, (width, height) = _open_png(path)
    assert image_format == "PNG" and 800 <= width <= 1000 and 750 <= height <= 900
    _only_file_is(tmp_path, "reliability.png")


def test_sparsification_plot_from_accumulator_output(tmp_path):
    curves = {name: _calibration_and_sparsification(seed)["sparsification"]
              for seed, name in enumerate(["tta", "prompt"])}
    path = tmp_path / "sparsification.png"
    plots.plot_sparsification(curves, path, "domain A")
    image_format, (width, height) = _open_png(path)
    assert image_format == "PNG" and 950 <= width <= 1100 and 500 <= height <= 650
    _only_file_is(tmp_path, "sparsification.png")


def test_qualitative_panel_accepts_numpy_and_torch(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    gt = np.zeros((60, 80), dtype=bool)
    gt[10:40, 20:60] = True
    prob = torch.zeros(60, 80)
    prob[12:42, 22:62] = 0.9
    uncertainty = torch.rand(60, 80, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "panel.png"
    plots.plot_qualitative_panel(image, gt, prob, uncertainty, path, "mask 17")
    image_format, (width, height) = _open_png(path)
    assert image_format == "PNG" and 1900 <= width <= 2200 and 400 <= height <= 550
    _only_file_is(tmp_path, "panel.png")


def test_qualitative_panel_rejects_mismatched_shapes_without_writing(tmp_path):
    path = tmp_path / "panel.png"
    with pytest.raises(PlotInputError, match="panel.png: prob shape"):
        plots.plot_qualitative_panel(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool),
                                     np.zeros((8, 9)), np.zeros((8, 8)), path, "bad")
    with pytest.raises(PlotInputError, match="image must be H x W x 3 uint8"):
        plots.plot_qualitative_panel(np.zeros((8, 8, 3)), np.zeros((8, 8), bool),
                                     np.zeros((8, 8)), np.zeros((8, 8)), path, "bad")
    assert list(tmp_path.iterdir()) == []


def test_prior_grid_plot(tmp_path):
    values = np.logspace(-3, 3, 13)
    nlls = 0.2 + 0.05 * (np.log10(values) - 0.5) ** 2
    nlls[0] = np.nan  # a failed fit is skipped, not plotted
    path = tmp_path / "prior.png"
    plots.plot_prior_grid(values, nlls, chosen=float(values[np.nanargmin(nlls)]), path=path)
    image_format, (width, height) = _open_png(path)
    assert image_format == "PNG" and 800 <= width <= 950 and 400 <= height <= 550
    _only_file_is(tmp_path, "prior.png")


def test_prior_grid_rejects_non_positive_values(tmp_path):
    with pytest.raises(PlotInputError, match="prior.png: prior precisions must be positive"):
        plots.plot_prior_grid([0.0, 1.0], [0.3, 0.2], chosen=1.0, path=tmp_path / "prior.png")


def test_plots_overwrite_existing_file_atomically(tmp_path):
    path = tmp_path / "reliability.png"
    path.write_bytes(b"old")
    curves = {"tta": _calibration_and_sparsification(0)["reliability"]}
    plots.plot_reliability_diagram(curves, path, "again")
    assert _open_png(path)[0] == "PNG"
    _only_file_is(tmp_path, "reliability.png")


def test_missing_method_data_names_the_method(tmp_path):
    with pytest.raises(PlotInputError, match="method 'tta' lacks sparsification data"):
        plots.plot_sparsification({"tta": {"fractions": [0.0]}}, tmp_path / "s.png", "bad")


# --------------------------------------------------------------------------- readability (issue #23)


def _drawn(figure):
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def _legend_clear_of_data(figure, axes):
    renderer = _drawn(figure)
    legend = axes.get_legend().get_window_extent(renderer)
    data = axes.get_window_extent(renderer)
    assert legend.x0 >= data.x1 and not legend.overlaps(data)
    assert figure.bbox.x1 >= legend.x1  # and inside the figure, not cut off


def test_reliability_legend_outside_counts_below_and_nearly_empty_bins_hollow():
    curves = {name: _calibration_and_sparsification(seed)["reliability"] for seed, name in enumerate(["a", "b"])}
    counts = [count * 10_000 for count in curves["a"]["reliability"]["count"]]
    counts[3] = 1  # a bin with one pixel of ~10 million: nearly empty
    curves["a"]["reliability"]["count"] = counts
    figure = plots.reliability_figure(curves, "t")
    axes, count_axes = figure.axes
    _legend_clear_of_data(figure, axes)
    heights = [round(bar.get_height()) for bar in count_axes.patches]
    assert heights[:len(counts)] == counts and count_axes.get_yscale() == "log"
    hollow = [line for line in axes.get_lines() if line.get_markerfacecolor() == "white" and len(line.get_xdata())]
    assert len(hollow) == 1 and len(hollow[0].get_xdata()) == 1
    assert hollow[0].get_xdata()[0] == pytest.approx(curves["a"]["reliability"]["mean_confidence"][3])
    # coinciding curves stay apart: each method its own marker shape
    markers = {line.get_label(): line.get_marker() for line in axes.get_lines() if line.get_label()[0] in "ab"}
    assert len(set(markers.values())) == 2


def test_sparsification_draws_random_baseline_once_per_curve_and_keeps_useful_range():
    good = _calibration_and_sparsification(0)["sparsification"]
    bad = dict(good, uncertainty=list(np.linspace(good["random"], 0.95, len(good["fractions"]))), ause=0.5)
    near = dict(good, random=good["random"] * (1 + 1e-4))  # on top of the others at any plot size
    apart = dict(good, random=good["random"] * 1.2, oracle=[v * 1.2 for v in good["oracle"]])
    figure = plots.sparsification_figure({"good": good, "same": dict(good), "bad": bad, "near": near,
                                          "apart": apart}, "t")
    (axes,) = figure.axes
    _legend_clear_of_data(figure, axes)
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels.count("random order (good, same, bad, near)") == 1 and "random order (apart)" in labels
    assert labels.count("oracle (good, same, bad, near)") == 1 and "oracle (apart)" in labels
    random_line = axes.get_lines()[labels.index("random order (good, same, bad, near)")]
    assert list(random_line.get_ydata()) == [pytest.approx(good["random"])] * 2
    good_colour = axes.get_lines()[labels.index(f"good (AUSE={good['ause']:.4f})")].get_color()
    assert random_line.get_color() == good_colour  # drawn in its first method's colour
    bottom, top = axes.get_ylim()
    assert bottom == 0 and top == pytest.approx(1.08 * plots.SPARSIFICATION_Y_LIMIT * 1.2 * good["random"])
    assert top < 0.95
    assert any("clipped" in text.get_text() for text in axes.texts)
    # the coinciding curves of good and same are told apart by marker shape and staggered markers
    good_line, same_line = (axes.get_lines()[labels.index(f"{m} (AUSE={good['ause']:.4f})")] for m in ("good", "same"))
    assert good_line.get_marker() != same_line.get_marker() and good_line.get_markevery() != same_line.get_markevery()


def test_qualitative_panel_keeps_aspect_shared_scale_unit_and_prompts():
    image = np.full((50, 150, 3), 255, np.uint8)
    gt = np.zeros((50, 150), bool)
    gt[10:30, 20:80] = True
    prob = gt * 0.9
    figure = plots.qualitative_figure(image, gt, prob, np.full((50, 150), 0.1), "t",
                                      points=[[30, 20], [100, 40], [0, 0]], point_labels=[1, 0, -1],
                                      box=[20, 10, 80, 30], uncertainty_range=(0.0, 0.7), uncertainty_name="entropy")
    width, height = figure.get_size_inches()
    assert (height - 1.0) / ((width - 1.2) / 5) == pytest.approx(50 / 150)
    _drawn(figure)
    image_axes, _, prediction_axes, heat_axes, _, colour_bar = figure.axes
    assert image_axes.get_images()[0].get_extent() == [-0.5, 149.5, 49.5, -0.5]  # the whole image, unstretched
    assert heat_axes.get_images()[0].get_clim() == (0.0, 0.7)  # the caller's shared scale, not the map's range
    assert colour_bar.get_ylabel() == "entropy (nats)"
    for axes in (image_axes, prediction_axes):
        offsets = np.concatenate([c.get_offsets() for c in axes.collections if isinstance(c, PathCollection)])
        assert sorted(map(tuple, offsets.tolist())) == [(30.0, 20.0), (100.0, 40.0)]  # padding not drawn
        (box,) = [p for p in axes.patches if isinstance(p, plots.Rectangle)]
        assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (20, 10, 60, 20)
    outline = [c for c in prediction_axes.collections if not isinstance(c, PathCollection)]
    assert len(outline) == 1 and outline[0].get_edgecolor()[0].tolist() == [*plots.OVERLAY_COLOUR, 1.0]


def test_debug_panels_keep_the_image_aspect_ratio():
    for height, width in ((192, 302), (310, 192)):
        figure_width, figure_height = sanity_figsize((height, width), 6)
        assert (figure_height - 0.6) / (figure_width / 6) == pytest.approx(height / width)
