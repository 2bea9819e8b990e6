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
from matplotlib import patheffects  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

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

#: Prediction overlay and outline (magenta: rare in natural images, and outlined in black on top).
OVERLAY_COLOUR = (1.0, 0.0, 1.0)
#: One marker shape per method, so methods stay apart where their curves coincide.
METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
#: Reliability bins holding fewer than this fraction of a method's pixels get a hollow marker.
NEARLY_EMPTY_FRACTION = 1e-3
#: Sparsification plots: the y axis ends at this multiple of the random-order error when a curve rises higher.
SPARSIFICATION_Y_LIMIT = 2.0
#: Sparsification plots: oracle and random-order curves of several methods within this fraction of the
#: random-order error of each other are drawn once (they would lie on top of each other).
SAME_CURVE_FRACTION = 2e-3
#: Width (inches) of one panel of a qualitative figure; its height follows the image's aspect ratio.
QUALITATIVE_PANEL_WIDTH = 3.2
#: Units of the uncertainty maps, shown in the colour bars (entropies in nats: natural logarithms).
UNCERTAINTY_UNITS: dict[str, str] = {
    "entropy": "nats", "total_entropy": "nats", "expected_entropy": "nats", "mutual_information": "nats",
    "std": "probability", "log_variance": "ln of logit variance",
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


def _legend_outside(axes, **kwargs) -> None:
    """The legend to the right of ``axes``, so it never covers data (the constrained layout makes room)."""
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kwargs)


def method_style(index: int) -> dict:
    """Line colour, marker and marker size of the ``index``-th method: markers shrink with the index
    so that curves lying on top of each other still show every method's marker nested inside."""
    return {"color": matplotlib.colormaps["tab10"](index % 10), "marker": METHOD_MARKERS[index % len(METHOD_MARKERS)],
            "markersize": max(3.0, 9.0 - 1.2 * index), "zorder": 3 + index}


def reliability_figure(bins_by_method: dict[str, dict], title: str, path: str | os.PathLike = "") -> Figure:
    """The figure of ``plot_reliability_diagram`` (not saved)."""
    if not bins_by_method:
        raise PlotInputError(f"{path}: no methods to plot")
    figure = Figure(figsize=(7.5, 7), layout="constrained")
    axes, count_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    nearly_empty_shown = False
    n_methods = len(bins_by_method)
    for index, (method, calibration) in enumerate(bins_by_method.items()):
        try:
            reliability = calibration["reliability"]
            confidence = np.asarray(reliability["mean_confidence"], dtype=float)
            frequency = np.asarray(reliability["observed_frequency"], dtype=float)
            count = np.asarray(reliability["count"], dtype=float)
            lower = np.asarray(reliability["bin_lower"], dtype=float)
            upper = np.asarray(reliability["bin_upper"], dtype=float)
            ece = float(calibration["ece"])
        except (KeyError, TypeError) as error:
            raise PlotInputError(f"{path}: method '{method}' lacks reliability data ({error!r})") from error
        if not confidence.shape == frequency.shape == count.shape == lower.shape == upper.shape:
            raise PlotInputError(f"{path}: method '{method}' reliability lists differ in length")
        style = method_style(index)
        occupied = np.isfinite(confidence) & np.isfinite(frequency) & (count > 0)
        nearly_empty = occupied & (count < NEARLY_EMPTY_FRACTION * max(count.sum(), 1.0))
        axes.plot(confidence[occupied], frequency[occupied], linewidth=1.4, label=f"{method} (ECE={ece:.4f})",
                  **style)
        if nearly_empty.any():
            nearly_empty_shown = True
            axes.plot(confidence[nearly_empty], frequency[nearly_empty], linestyle="none", marker=style["marker"],
                      markersize=style["markersize"] + 1, markerfacecolor="white", markeredgecolor=style["color"],
                      zorder=style["zorder"] + 0.5)
        width = (upper - lower) / n_methods
        count_axes.bar(lower + index * width, count, width=width, align="edge", color=style["color"],
                       label=method)
    if nearly_empty_shown:
        axes.plot([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="black",
                  label=f"hollow: bin with < {NEARLY_EMPTY_FRACTION:.1%} of the pixels")
    axes.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed foreground frequency", title=title)
    axes.grid(alpha=0.3)
    _legend_outside(axes)
    count_axes.set(xlabel="predicted foreground probability (bin)", ylabel="pixels per bin")
    count_axes.set_yscale("log")
    count_axes.grid(alpha=0.3)
    return figure


def plot_reliability_diagram(
    bins_by_method: dict[str, dict], path: str | os.PathLike, title: str
) -> None:
    """Reliability diagram: observed foreground frequency vs mean predicted probability, and below
    it the number of pixels in each bin (log scale).

    Args:
        bins_by_method: method name -> the dict of ``CalibrationAccumulator.compute()``; used keys:
            ``ece`` and ``reliability`` with per-bin lists ``bin_lower``, ``bin_upper``,
            ``mean_confidence``, ``observed_frequency`` and ``count``. Empty bins (NaN) are skipped.
        path: output PNG file.
        title: figure title.
    One line per method (legend, with its ECE, outside the plot), the diagonal of perfect calibration
    dashed; bins holding under ``NEARLY_EMPTY_FRACTION`` of a method's pixels get a hollow marker.
    """
    _save(reliability_figure(bins_by_method, title, path), path)


def _distinct_curves(curves: list[tuple[str, np.ndarray]], tolerance: float) -> list[tuple[list[str], np.ndarray]]:
    """Group methods whose curves agree within ``tolerance`` (they would be drawn on top of each
    other): ``[(methods, curve)]`` in first-seen order."""
    groups: list[tuple[list[str], np.ndarray]] = []
    for method, curve in curves:
        for names, shown in groups:
            if shown.shape == curve.shape and np.allclose(shown, curve, rtol=0.0, atol=tolerance, equal_nan=True):
                names.append(method)
                break
        else:
            groups.append(([method], curve))
    return groups


def sparsification_figure(curves_by_method: dict[str, dict], title: str, path: str | os.PathLike = "") -> Figure:
    """The figure of ``plot_sparsification`` (not saved)."""
    if not curves_by_method:
        raise PlotInputError(f"{path}: no methods to plot")
    figure = Figure(figsize=(8.5, 4.8), layout="constrained")
    axes = figure.subplots()
    oracles, randoms, tops = [], [], []
    for index, (method, curves) in enumerate(curves_by_method.items()):
        try:
            fractions = np.asarray(curves["fractions"], dtype=float)
            by_uncertainty = np.asarray(curves["uncertainty"], dtype=float)
            oracle = np.asarray(curves["oracle"], dtype=float)
            random = float(curves["random"])
            ause = float(curves["ause"])
        except (KeyError, TypeError) as error:
            raise PlotInputError(f"{path}: method '{method}' lacks sparsification data ({error!r})") from error
        if not fractions.shape == by_uncertainty.shape == oracle.shape:
            raise PlotInputError(f"{path}: method '{method}' curves differ in length")
        style = method_style(index)
        step = max(1, len(fractions) // 8)
        axes.plot(fractions, by_uncertainty, linewidth=1.8, label=f"{method} (AUSE={ause:.4f})",
                  markevery=(index % step, step), **style)
        oracles.append((method, np.stack([fractions, oracle])))
        randoms.append((method, np.array([random])))
        tops.append(by_uncertainty[fractions <= 0.9])
    baseline = max((float(v[0]) for _, v in randoms if np.isfinite(v[0])), default=math.nan)
    tolerance = SAME_CURVE_FRACTION * (baseline if math.isfinite(baseline) and baseline > 0 else 1.0)
    colour_of = {method: method_style(index)["color"] for index, method in enumerate(curves_by_method)}
    for names, curve in _distinct_curves(oracles, tolerance):
        axes.plot(curve[0], curve[1], color=colour_of[names[0]], linewidth=1.0, linestyle="--",
                  label=f"oracle ({', '.join(names)})")
    for names, value in _distinct_curves(randoms, tolerance):
        axes.axhline(float(value[0]), color=colour_of[names[0]], linewidth=1.0, linestyle=":",
                     label=f"random order ({', '.join(names)})")
    highest = max((float(np.nanmax(t)) for t in tops if t.size and np.isfinite(t).any()), default=math.nan)
    if math.isfinite(baseline) and baseline > 0:
        top = SPARSIFICATION_Y_LIMIT * baseline
        if math.isfinite(highest) and highest <= top:
            top = max(highest, baseline)
        elif math.isfinite(highest):
            axes.text(0.99, 0.98, f"y clipped at {SPARSIFICATION_Y_LIMIT:g} x the random-order error",
                      transform=axes.transAxes, ha="right", va="top", fontsize=7, color="dimgrey")
        axes.set_ylim(0, 1.08 * top)
    else:
        axes.set_ylim(bottom=0)
    axes.set(xlim=(0, 1), xlabel="fraction of pixels removed (most uncertain first)",
             ylabel="mean error of kept pixels", title=title)
    axes.grid(alpha=0.3)
    _legend_outside(axes)
    return figure


def plot_sparsification(
    curves_by_method: dict[str, dict], path: str | os.PathLike, title: str
) -> None:
    """Sparsification curves: mean error of the kept pixels vs fraction removed.

    Args:
        curves_by_method: method name -> the dict of ``SparsificationAccumulator.compute()`` or
            ``sparsification_curve``; used keys ``fractions``, ``uncertainty``, ``oracle``,
            ``random`` (the mean error: the expected curve of a random order) and ``ause``.
        path: output PNG file.
        title: figure title.
    Each method's curve is solid with its own markers (staggered, so coinciding curves stay
    distinguishable) and its AUSE in the legend (outside the plot); the oracle curves (dashed) and
    the random-order baselines (dotted) are drawn once per distinct curve (``SAME_CURVE_FRACTION``),
    in the colour of the first method they belong to, naming their methods.
    The y axis ends at ``SPARSIFICATION_Y_LIMIT`` times the random-order error when a curve rises
    higher (a note says so), so the useful part of the curves stays readable.
    """
    _save(sparsification_figure(curves_by_method, title, path), path)


def click_curves_figure(curves_by_domain: dict[str, dict], title: str, dashed: Sequence[str] = (),
                        thresholds: Sequence[float] = (), path: str | os.PathLike = "") -> Figure:
    """The figure of ``plot_click_curves`` (not saved)."""
    if not curves_by_domain or not any(panel.get("policies") for panel in curves_by_domain.values()):
        raise PlotInputError(f"{path}: no click curves to plot")
    policies = list(dict.fromkeys(p for panel in curves_by_domain.values() for p in panel.get("policies", {})))
    figure = Figure(figsize=(4.2 * len(curves_by_domain) + 2.4, 4.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(curves_by_domain), sharey=True, squeeze=False)[0])
    for axis, (domain, panel) in zip(axes, curves_by_domain.items()):
        for policy, curve in panel.get("policies", {}).items():
            try:
                clicks = np.asarray(curve["clicks"], dtype=float)
                mean, lo, hi = (np.asarray(curve[key], dtype=float) for key in ("mean", "lo", "hi"))
            except (KeyError, TypeError) as error:
                raise PlotInputError(f"{path}: policy '{policy}' of {domain} lacks curve data ({error!r})") from error
            if not clicks.shape == mean.shape == lo.shape == hi.shape:
                raise PlotInputError(f"{path}: policy '{policy}' of {domain}: curve lists differ in length")
            index = policies.index(policy)
            style = method_style(index)
            step = max(1, len(clicks) // 7)
            axis.plot(clicks, mean, linewidth=1.6, linestyle="--" if policy in dashed else "-", label=policy,
                      markevery=(index % step, step), **style)
            axis.fill_between(clicks, lo, hi, color=style["color"], alpha=0.12, linewidth=0, zorder=1)
        for threshold in thresholds:
            axis.axhline(threshold, color="grey", linewidth=0.8, linestyle=":", zorder=0)
        axis.set_title(f"{domain} (n={panel.get('n_images', '?')} images)", fontsize=10)
        axis.set(xlabel="clicks")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
    lowest = min((float(np.nanmin(curve["lo"])) for panel in curves_by_domain.values()
                  for curve in panel.get("policies", {}).values() if np.isfinite(curve["lo"]).any()), default=0.0)
    axes[0].set_ylim(max(0.0, math.floor(10 * min(lowest, *thresholds, 1.0)) / 10 - 0.05), 1.01)
    axes[0].set_ylabel("mean IoU (shaded: 95% bootstrap interval)")
    if thresholds:
        axes[-1].plot([], [], color="grey", linewidth=0.8, linestyle=":",
                      label="IoU " + " / ".join(f"{t:g}" for t in thresholds) + " (NoC)")
    _legend_outside(axes[-1])
    figure.suptitle(title)
    return figure


def plot_click_curves(curves_by_domain: dict[str, dict], path: str | os.PathLike, title: str,
                      dashed: Sequence[str] = (), thresholds: Sequence[float] = ()) -> None:
    """Mean IoU against the number of clicks, one panel per domain, one line per click policy.

    Args:
        curves_by_domain: domain -> ``{"n_images": int, "policies": {policy: {"clicks", "mean", "lo",
            "hi"}}}`` (lists of one length: click counts, the mean IoU after them and its interval).
        path: output PNG file.
        title: figure title.
        dashed: policies drawn dashed (the oracle annotator, a reference rather than a contender).
        thresholds: IoU levels drawn as dotted grey lines (those NoC counts clicks to).
    Each policy keeps one colour and marker in every panel (markers staggered, so coinciding curves
    stay distinguishable), its interval shaded in its colour; the panels share the y axis and the
    legend sits to the right of the last one.
    """
    _save(click_curves_figure(curves_by_domain, title, dashed, thresholds, path), path)


def uncertainty_unit(map_name: str) -> str:
    """The colour-bar label of an uncertainty map: its name and unit."""
    return f"{map_name} ({UNCERTAINTY_UNITS.get(map_name, 'a.u.')})"


def qualitative_figure(image, gt, prob, uncertainty, title: str, path: str | os.PathLike = "", *,
                       points=None, point_labels=None, box=None, uncertainty_range: tuple[float, float] | None = None,
                       uncertainty_name: str = "uncertainty") -> Figure:
    """The figure of ``plot_qualitative_panel`` (not saved)."""
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
    overlay[prediction] = 0.55 * overlay[prediction] + 0.45 * np.array(OVERLAY_COLOUR)

    height, width = height_width
    figure = Figure(figsize=qualitative_figsize(height, width), layout="constrained")
    axes = figure.subplots(1, 5)
    axes[0].imshow(image)
    axes[0].set_title("image + prompts")
    axes[1].imshow(gt, cmap=ListedColormap(["black", "white"]), vmin=0, vmax=1, interpolation="nearest")
    axes[1].set_title("ground truth")
    axes[2].imshow(overlay)
    if prediction.any() and not prediction.all():
        axes[2].contour(prediction.astype(float), levels=[0.5], colors=[OVERLAY_COLOUR], linewidths=1.2,
                        path_effects=[patheffects.withStroke(linewidth=3.0, foreground="black")])
    axes[2].set_title(f"prediction (p > {PROB_THRESHOLD:g})")
    low, high = uncertainty_range if uncertainty_range is not None else (None, None)
    heat = axes[3].imshow(uncertainty, cmap="inferno", interpolation="nearest", vmin=low, vmax=high)
    axes[3].set_title("uncertainty")
    figure.colorbar(heat, ax=axes[3], fraction=0.046, pad=0.04, label=uncertainty_unit(uncertainty_name))
    axes[4].imshow(error_rgb, interpolation="nearest")
    axes[4].set_title("errors")
    axes[4].legend(
        handles=[Patch(color=ERROR_COLOURS[name], label=name) for name in
                 ("false positive", "false negative", "true positive")],
        loc="upper left", bbox_to_anchor=(0.0, -0.02), fontsize=7, ncols=3, frameon=False,
        handlelength=1.0, columnspacing=0.8,
    )
    for axis in axes[:3]:
        draw_prompts(axis, points, point_labels, box)
    for axis in axes:
        axis.set_axis_off()
    figure.suptitle(title)
    return figure


def qualitative_figsize(height: int, width: int) -> tuple[float, float]:
    """Figure size (inches) of a five-panel row whose panels keep the image's aspect ratio."""
    panel_width = QUALITATIVE_PANEL_WIDTH
    return 5 * panel_width + 1.2, panel_width * height / max(width, 1) + 1.0


def draw_prompts(axis, points=None, point_labels=None, box=None) -> None:
    """Clicks (positive: green discs, negative: red crosses) and the box prompt, outlined in black so
    they show on any image. ``points``: ``N x 2`` (x, y) pixels; ``point_labels``: ``N`` (1 positive,
    0 negative, -1 padding, skipped); ``box``: ``(x0, y0, x1, y1)`` pixels or None."""
    outline = [patheffects.withStroke(linewidth=3.0, foreground="black")]
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in np.asarray(_to_numpy(box, "", "box"), dtype=float).reshape(4))
        axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.5,
                                 path_effects=outline, zorder=5))
    if points is None:
        return
    points = np.asarray(_to_numpy(points, "", "points"), dtype=float).reshape(-1, 2)
    labels = (np.ones(len(points)) if point_labels is None
              else np.asarray(_to_numpy(point_labels, "", "point_labels")).reshape(-1))
    for value, marker, colour in ((1, "o", "lime"), (0, "X", "red")):
        chosen = points[labels == value]
        if len(chosen):
            axis.scatter(chosen[:, 0], chosen[:, 1], s=40, marker=marker, c=colour, edgecolors="black",
                         linewidths=1.0, zorder=6)


def plot_qualitative_panel(
    image, gt, prob, uncertainty, path: str | os.PathLike, title: str, *, points=None, point_labels=None,
    box=None, uncertainty_range: tuple[float, float] | None = None, uncertainty_name: str = "uncertainty",
) -> None:
    """Five panels in a row, each at the image's aspect ratio: image, ground truth, prediction,
    uncertainty, error map; the prompts (clicks, box) drawn on the first three.

    Args:
        image: ``H x W x 3`` uint8 RGB.
        gt: ``H x W`` bool ground truth.
        prob: ``H x W`` foreground probability in [0, 1]; the prediction is ``prob > 0.5``,
            drawn as a translucent overlay outlined in ``OVERLAY_COLOUR`` on black.
        uncertainty: ``H x W`` float map, drawn as a heat map with a colour bar.
        path: output PNG file.
        title: figure title.
        points, point_labels, box: the prompt set (``draw_prompts``), image pixels.
        uncertainty_range: ``(vmin, vmax)`` of the colour scale (the caller shares one per
            uncertainty kind across methods); None: the map's own range.
        uncertainty_name: the map's name; the colour bar shows it with its unit (``UNCERTAINTY_UNITS``).
    The error map colours true positives grey, false positives red and false negatives blue.
    """
    _save(qualitative_figure(image, gt, prob, uncertainty, title, path, points=points, point_labels=point_labels,
                             box=box, uncertainty_range=uncertainty_range, uncertainty_name=uncertainty_name), path)


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
    figure = Figure(figsize=(7.5, 4), layout="constrained")
    axes = figure.subplots()
    axes.plot(values[finite], nlls[finite], marker="o", label="validation NLL")
    axes.axvline(chosen, color="tab:red", linestyle="--", label=f"chosen = {chosen:.3g}")
    axes.set_xscale("log")
    axes.set(xlabel="prior precision", ylabel="NLL (nats / pixel)", title=title)
    axes.grid(alpha=0.3, which="both")
    _legend_outside(axes)
    _save(figure, path)
