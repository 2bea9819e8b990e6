"""Evaluation figures written as PNG files.

Figures are built on ``matplotlib.figure.Figure`` with the Agg renderer (no pyplot global state,
so nothing needs closing and nothing opens a window) and written atomically through
``modules.core.fileio.atomic_path``. Array inputs may be numpy arrays or torch tensors (any device).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from modules.core.fileio import atomic_path  # noqa: E402
from modules.scoring.common import PROB_THRESHOLD  # noqa: E402

DPI = 120

# Error-map colours (RGB in [0, 1]) keyed by pixel outcome.
ERROR_COLOURS: dict[str, tuple[float, float, float]] = {
    "true negative": (0.0, 0.0, 0.0),
    "true positive": (0.55, 0.55, 0.55),
    "false positive": (0.9, 0.1, 0.1),
    "false negative": (0.1, 0.35, 0.95),
}


class PlotInputError(ValueError):
    """Malformed input to a plotting function."""


def _to_numpy(array, path: str | os.PathLike, name: str) -> np.ndarray:
    """Numpy copy of a numpy array or (any-device) torch tensor."""
    if hasattr(array, "detach"):
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()  # bf16 has no numpy dtype
    try:
        return np.asarray(array)
    except (TypeError, ValueError) as error:
        raise PlotInputError(f"{path}: {name} is not array-like ({error})") from error


def _save(figure: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)


def plot_reliability_diagram(
    bins_by_method: dict[str, dict], path: str | os.PathLike, title: str
) -> None:
    """Reliability diagram: observed foreground frequency vs mean predicted probability.

    Args:
        bins_by_method: method name -> the dict of ``CalibrationAccumulator.compute()``; used keys:
            ``ece`` and ``reliability`` with per-bin lists ``mean_confidence``,
            ``observed_frequency`` and ``count``. Empty bins (NaN) are skipped.
        path: output PNG file.
        title: figure title.
    One panel, one line with markers per method (legend shows its ECE), the diagonal of perfect
    calibration dashed.
    """
    if not bins_by_method:
        raise PlotInputError(f"{path}: no methods to plot")
    figure = Figure(figsize=(5.5, 5))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for method, calibration in bins_by_method.items():
        try:
            reliability = calibration["reliability"]
            confidence = np.asarray(reliability["mean_confidence"], dtype=float)
            frequency = np.asarray(reliability["observed_frequency"], dtype=float)
            ece = float(calibration["ece"])
        except (KeyError, TypeError) as error:
            raise PlotInputError(f"{path}: method '{method}' lacks reliability data ({error!r})") from error
        occupied = np.isfinite(confidence) & np.isfinite(frequency)
        axes.plot(confidence[occupied], frequency[occupied], marker="o", markersize=4,
                  label=f"{method} (ECE={ece:.4f})")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability",
             ylabel="observed foreground frequency", title=title)
    axes.set_aspect("equal")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def plot_sparsification(
    curves_by_method: dict[str, dict], path: str | os.PathLike, title: str
) -> None:
    """Sparsification curves: mean error of the kept pixels vs fraction removed.

    Args:
        curves_by_method: method name -> the dict of ``SparsificationAccumulator.compute()`` or
            ``sparsification_curve``; used keys ``fractions``, ``uncertainty``, ``oracle``, ``ause``.
        path: output PNG file.
        title: figure title.
    Each method's curve is solid and its oracle dashed in the same colour; AUSE in the legend.
    """
    if not curves_by_method:
        raise PlotInputError(f"{path}: no methods to plot")
    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    colours = matplotlib.colormaps["tab10"]
    for index, (method, curves) in enumerate(curves_by_method.items()):
        try:
            fractions = np.asarray(curves["fractions"], dtype=float)
            by_uncertainty = np.asarray(curves["uncertainty"], dtype=float)
            oracle = np.asarray(curves["oracle"], dtype=float)
            ause = float(curves["ause"])
        except (KeyError, TypeError) as error:
            raise PlotInputError(f"{path}: method '{method}' lacks sparsification data ({error!r})") from error
        if not fractions.shape == by_uncertainty.shape == oracle.shape:
            raise PlotInputError(f"{path}: method '{method}' curves differ in length")
        colour = colours(index % 10)
        axes.plot(fractions, by_uncertainty, color=colour, linewidth=1.8, label=f"{method} (AUSE={ause:.4f})")
        axes.plot(fractions, oracle, color=colour, linewidth=1.2, linestyle="--", label=f"{method} oracle")
    axes.set(xlim=(0, 1), xlabel="fraction of pixels removed (most uncertain first)",
             ylabel="mean error of kept pixels", title=title)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def plot_qualitative_panel(
    image, gt, prob, uncertainty, path: str | os.PathLike, title: str
) -> None:
    """Five panels in a row: image, ground truth, prediction, uncertainty, error map.

    Args:
        image: ``H x W x 3`` uint8 RGB.
        gt: ``H x W`` bool ground truth.
        prob: ``H x W`` foreground probability in [0, 1]; the prediction is ``prob > 0.5``,
            drawn as a translucent overlay on the image.
        uncertainty: ``H x W`` float map, drawn as a heat map with a colour bar (its own range).
        path: output PNG file.
        title: figure title.
    The error map colours true positives grey, false positives red and false negatives blue.
    """
    image = _to_numpy(image, path, "image")
    gt = _to_numpy(gt, path, "gt")
    prob = _to_numpy(prob, path, "prob")
    uncertainty = _to_numpy(uncertainty, path, "uncertainty")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PlotInputError(f"{path}: image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
    height_width = image.shape[:2]
    for name, array in (("gt", gt), ("prob", prob), ("uncertainty", uncertainty)):
        if array.shape != height_width:
            raise PlotInputError(f"{path}: {name} shape {array.shape} does not match image {height_width}")
    gt = gt.astype(bool)
    prediction = prob > PROB_THRESHOLD

    outcome = (2 * prediction.astype(np.int64) + gt.astype(np.int64))  # 0 TN, 1 FN, 2 FP, 3 TP
    palette = np.array([ERROR_COLOURS["true negative"], ERROR_COLOURS["false negative"],
                        ERROR_COLOURS["false positive"], ERROR_COLOURS["true positive"]])
    error_rgb = palette[outcome]
    overlay = image.astype(float) / 255.0
    overlay[prediction] = 0.5 * overlay[prediction] + 0.5 * np.array([0.1, 0.8, 0.2])

    figure = Figure(figsize=(17, 3.9))
    axes = figure.subplots(1, 5)
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(gt, cmap=ListedColormap(["black", "white"]), vmin=0, vmax=1, interpolation="nearest")
    axes[1].set_title("ground truth")
    axes[2].imshow(overlay)
    axes[2].set_title("prediction (p > 0.5)")
    heat = axes[3].imshow(uncertainty, cmap="inferno", interpolation="nearest")
    axes[3].set_title("uncertainty")
    figure.colorbar(heat, ax=axes[3], fraction=0.046, pad=0.04)
    axes[4].imshow(error_rgb, interpolation="nearest")
    axes[4].set_title("errors")
    axes[4].legend(
        handles=[Patch(color=ERROR_COLOURS[name], label=name) for name in
                 ("false positive", "false negative", "true positive")],
        loc="lower right", fontsize=7, framealpha=0.8,
    )
    for axis in axes:
        axis.set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def plot_prior_grid(
    values: Sequence[float],
    nlls: Sequence[float],
    chosen: float,
    path: str | os.PathLike,
    title: str = "Laplace prior precision",
) -> None:
    """Validation NLL against the Laplace prior precision (log x axis), chosen value marked.

    Args:
        values: prior precisions tried (> 0).
        nlls: validation NLL (nats per pixel) for each value; non-finite entries are skipped.
        chosen: the selected prior precision (drawn as a vertical line).
        path: output PNG file.
        title: figure title.
    """
    values = np.asarray(_to_numpy(values, path, "values"), dtype=float).reshape(-1)
    nlls = np.asarray(_to_numpy(nlls, path, "nlls"), dtype=float).reshape(-1)
    if values.shape != nlls.shape or values.size == 0:
        raise PlotInputError(f"{path}: need as many NLLs as prior values, got {nlls.size} and {values.size}")
    if np.any(values <= 0) or not (math.isfinite(chosen) and chosen > 0):
        raise PlotInputError(f"{path}: prior precisions must be positive for a log axis")
    order = np.argsort(values)
    values, nlls = values[order], nlls[order]
    finite = np.isfinite(nlls)
    figure = Figure(figsize=(5.5, 4))
    axes = figure.subplots()
    axes.plot(values[finite], nlls[finite], marker="o", label="validation NLL")
    axes.axvline(chosen, color="tab:red", linestyle="--", label=f"chosen = {chosen:.3g}")
    axes.set_xscale("log")
    axes.set(xlabel="prior precision", ylabel="NLL (nats / pixel)", title=title)
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.tight_layout()
    _save(figure, path)
