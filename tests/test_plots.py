"""Tests of modules.scoring.plots: each figure is a readable PNG of the expected size, written atomically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modules.scoring import metrics

from modules.scoring import plots
from modules.scoring.plots import PlotInputError


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
    assert image_format == "PNG" and 500 <= width <= 800 and 450 <= height <= 700
    _only_file_is(tmp_path, "reliability.png")


def test_sparsification_plot_from_accumulator_output(tmp_path):
    curves = {name: _calibration_and_sparsification(seed)["sparsification"]
              for seed, name in enumerate(["tta", "prompt"])}
    path = tmp_path / "sparsification.png"
    plots.plot_sparsification(curves, path, "domain A")
    image_format, (width, height) = _open_png(path)
    assert image_format == "PNG" and 600 <= width <= 850 and 450 <= height <= 650
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
    assert image_format == "PNG" and 1800 <= width <= 2200 and 400 <= height <= 550
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
    assert image_format == "PNG" and 550 <= width <= 750 and 400 <= height <= 550
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
