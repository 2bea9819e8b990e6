"""``predict_uncertainty.py``: SAM's mask and the fitted uncertainty of one image for a person's
prompts, written as an overlay PNG, the maps (``.npy`` and ``.png``) and a small JSON.

The work is ``interactive.predictor.UncertainPredictor``; this module parses the prompts, runs it
and writes the files (atomically) into the output folder under the project root:

- ``overlay.png``: the image with SAM's mask, the clicks and the box, then one panel per method
  with its primary uncertainty map over the image (``overlay_set<i>.png`` per prompt set when
  several are given);
- ``probability.npy`` (``P x H x W`` float32, SAM's mask probability) and
  ``<method>_<map>.npy`` (``P x H x W`` float32), each with a ``.png`` (``_set<i>`` per prompt set
  when ``P > 1``);
- ``prediction.json``: the prompts, SAM's predicted IoU, each method's mask-quality scores and
  the suggested next click of each click policy the methods allow.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from modules.core.errors import PipelineError
from modules.core.fileio import atomic_path, atomic_write_json
from modules.interactive.click_policies import CLICK_POLICIES
from modules.interactive.predictor import (MASK_METHOD, Prediction, PredictorError,
                                           UncertainPredictor, suggest_click)

log = logging.getLogger("pipeline")

OVERLAY_FILE = "overlay.png"
SUMMARY_FILE = "prediction.json"
PROBABILITY_NAME = "probability"
#: Colour map of the uncertainty PNGs (the probability PNG is grey).
UNCERTAINTY_CMAP = "magma"
DPI = 100


# --------------------------------------------------------------------------- prompts from the command line


def _numbers(text: str, flag: str, counts: tuple[int, ...], form: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise PipelineError(f"{flag} {text!r}: expected {form}")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """``"X,Y"`` or ``"X,Y,LABEL"`` (label 1 positive, the default, or 0 negative) -> ``(x, y, label)``."""
    values = _numbers(text, "--point", (2, 3), "X,Y or X,Y,LABEL (label 1 or 0)")
    label = int(values[2]) if len(values) == 3 else 1
    if len(values) == 3 and values[2] not in (0, 1):
        raise PipelineError(f"--point {text!r}: the label must be 1 (positive) or 0 (negative)")
    return values[0], values[1], label


def parse_box(text: str) -> list[float]:
    """``"X0,Y0,X1,Y1"`` (inclusive ORIGINAL pixels) -> 4 numbers."""
    return _numbers(text, "--box", (4,), "X0,Y0,X1,Y1")


def promptsets_from_arguments(points: list[str], box: str | None, prompts_file: str | None) -> list[dict]:
    """The prompt sets of the command: those of ``--prompts FILE`` (a JSON list of ``{"points":
    [[x, y], ...], "labels": [1, 0, ...], "box": [x0, y0, x1, y1] or null}``), or one set of the
    ``--point`` clicks and the ``--box``."""
    if prompts_file is not None:
        if points or box is not None:
            raise PipelineError("--prompts: give either a prompts file or --point / --box, not both")
        try:
            sets = json.loads(Path(prompts_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{prompts_file}: unreadable prompts file ({type(exc).__name__}: {exc})") from None
        if not isinstance(sets, list) or not sets or not all(isinstance(s, dict) for s in sets):
            raise PipelineError(f"{prompts_file}: expected a non-empty JSON list of prompt sets "
                                '({"points": [[x, y], ...], "labels": [1, ...], "box": [x0, y0, x1, y1]})')
        return [{"points": s.get("points") or None, "labels": s.get("labels"), "box": s.get("box")} for s in sets]
    if not points and box is None:
        raise PipelineError("no prompt: give --point X,Y[,LABEL] (repeatable), --box X0,Y0,X1,Y1 or --prompts FILE")
    clicks = [parse_point(text) for text in points]
    return [{"points": [[x, y] for x, y, _ in clicks] or None, "labels": [label for _, _, label in clicks] or None,
             "box": parse_box(box) if box is not None else None}]


# --------------------------------------------------------------------------- writing


def _png(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="png")


def _npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def colour(values: np.ndarray, cmap: str, low: float, high: float) -> np.ndarray:
    """``H x W`` values -> ``H x W x 3`` uint8 through ``cmap`` on ``[low, high]``."""
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return (colormaps[cmap](np.clip(scaled, 0.0, 1.0))[..., :3] * 255).round().astype(np.uint8)


def set_suffix(index: int, count: int) -> str:
    return "" if count == 1 else f"_set{index}"


def write_maps(folder: Path, prediction: Prediction) -> list[str]:
    """``probability`` and every ``<method>_<map>`` as ``.npy`` (``P x H x W``) and ``.png``; returns
    the file names."""
    arrays = {PROBABILITY_NAME: prediction.probability.numpy()}
    for method, output in prediction.methods.items():
        arrays.update({f"{method}_{name}": values.numpy() for name, values in output.maps.items()})
    written = []
    count = prediction.num_promptsets
    for name, values in arrays.items():
        _npy(folder / f"{name}.npy", values.astype(np.float32))
        written.append(f"{name}.npy")
        cmap, (low, high) = ("gray", (0.0, 1.0)) if name == PROBABILITY_NAME else \
            (UNCERTAINTY_CMAP, (float(values.min()), float(values.max())))
        for index in range(count):
            png = f"{name}{set_suffix(index, count)}.png"
            _png(folder / png, colour(values[index], cmap, low, high))
            written.append(png)
    return written


def _draw_prompts(axis, promptset: dict) -> None:
    points = np.asarray(promptset["points"], dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(promptset["labels"])
    axis.scatter(points[labels == 1, 0], points[labels == 1, 1], c="lime", s=40, marker="o", edgecolors="black")
    axis.scatter(points[labels == 0, 0], points[labels == 0, 1], c="red", s=40, marker="X", edgecolors="black")
    if promptset.get("box_given"):
        x0, y0, x1, y1 = promptset["box"]
        axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="yellow",
                                 linewidth=1.5))


def write_overlay(path: Path, image: np.ndarray, prediction: Prediction, index: int, boxes_given: list[bool],
                  suggestions: dict[str, list]) -> None:
    """One PNG: the image with SAM's mask (fill and contour), the clicks and the box, then per method
    its primary map over the greyed image with that method's mask contour."""
    height, width = image.shape[:2]
    methods = list(prediction.methods)
    panel = 3.2
    figure = Figure(figsize=(panel * (len(methods) + 1), panel * height / width + 0.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(methods) + 1, squeeze=False)[0]
    promptset = {**prediction.record["promptsets"][index], "box_given": boxes_given[index]}
    mask = prediction.probability[index].numpy() > 0.5
    axes[0].imshow(image)
    axes[0].imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.4, vmin=0, vmax=1)
    if mask.any() and not mask.all():
        axes[0].contour(mask, levels=[0.5], colors="cyan", linewidths=1.0)
    _draw_prompts(axes[0], promptset)
    axes[0].set_title(f"SAM mask, predicted IoU {float(prediction.predicted_iou[index]):.3f}", fontsize=8)
    grey = image.mean(axis=2)
    for axis, method in zip(axes[1:], methods):
        output = prediction.methods[method]
        values = output.maps[output.primary_map][index].numpy()
        axis.imshow(grey, cmap="gray")
        shown = axis.imshow(values, cmap=UNCERTAINTY_CMAP, alpha=0.75)
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
        method_mask = output.probability[index].numpy() > 0.5
        if method_mask.any() and not method_mask.all():
            axis.contour(method_mask, levels=[0.5], colors="cyan", linewidths=0.8)
        _draw_prompts(axis, promptset)
        expected_iou = output.quality["expected_iou"][index]
        axis.set_title(f"{method}: {output.primary_map}\nexpected IoU {expected_iou:.3f}", fontsize=8)
    for policy, per_set in suggestions.items():
        if per_set[index] is not None and CLICK_POLICIES[policy].strategy in methods:
            axis = axes[1 + methods.index(CLICK_POLICIES[policy].strategy)]
            x, y = per_set[index]
            axis.scatter([x], [y], c="white", s=90, marker="*", edgecolors="black")
            axis.annotate(policy, (x, y), xytext=(4, 4), textcoords="offset points", color="white", fontsize=7)
    for axis in axes:
        axis.set_xlim(-0.5, width - 0.5)
        axis.set_ylim(height - 0.5, -0.5)
        axis.axis("off")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)


def available_policies(prediction: Prediction) -> list[str]:
    """The click policies whose map the prediction holds (and ``random``)."""
    return [name for name, policy in CLICK_POLICIES.items()
            if policy.kind == "random" or (policy.kind == "map" and policy.strategy in prediction.methods)]


def summary(image_path: str, prediction: Prediction, suggestions: dict[str, list]) -> dict:
    """The JSON record of one prediction (NaN scores, e.g. of an empty mask, become null)."""
    def plain(values) -> list:
        return [None if not np.isfinite(v) else round(float(v), 6) for v in values]

    return {
        "image": image_path,
        "image_hw": list(prediction.image_hw),
        "mask_method": MASK_METHOD,
        "multimask_policy": prediction.multimask_policy,
        "promptsets": [{"points": s["points"], "labels": s["labels"], "box": s["box"]}
                       for s in prediction.record["promptsets"]],
        "predicted_iou": plain(prediction.predicted_iou),
        "methods": {name: {"primary_map": output.primary_map, "maps": sorted(output.maps),
                           "quality": {column: plain(values) for column, values in output.quality.items()}}
                    for name, output in prediction.methods.items()},
        "suggested_click": suggestions,
    }


# --------------------------------------------------------------------------- the command


def run_command(ctx, image_path: str, promptsets: list[dict], predictor: UncertainPredictor,
                multimask_policy: str | None = None) -> dict:
    """Predict (``multimask_policy`` as ``UncertainPredictor.predict``'s), then write every file into
    ``ctx.output_dir``; returns the summary."""
    folder = ctx.output_dir
    predictor.set_image(image_path)
    log.info("[%s] %s (%d x %d), %d prompt set(s), methods: %s", ctx.name, image_path, predictor.image_hw[1],
             predictor.image_hw[0], len(promptsets), ", ".join(predictor.methods))
    prediction = predictor.predict_sets(promptsets, multimask_policy=multimask_policy)
    if ctx.cfg.sam.prompt_mode == "points" and any(s.get("box") is not None for s in promptsets):
        log.warning("[%s] sam.prompt_mode is 'points': SAM does not read the box (it is drawn only)", ctx.name)
    suggestions = {policy: [suggest_click(prediction, policy, index) for index in range(prediction.num_promptsets)]
                   for policy in available_policies(prediction)}
    suggestions = {policy: [None if c is None else list(c) for c in per_set] for policy, per_set in suggestions.items()}
    written = write_maps(folder, prediction)
    boxes_given = [s.get("box") is not None for s in promptsets]
    count = prediction.num_promptsets
    for index in range(count):
        name = f"overlay{set_suffix(index, count)}.png"
        write_overlay(folder / name, predictor.image, prediction, index, boxes_given, suggestions)
        written.append(name)
    record = summary(str(image_path), prediction, suggestions)
    atomic_write_json(folder / SUMMARY_FILE, record)
    log.info("[%s] %d files -> %s", ctx.name, len(written) + 1, folder)
    ctx.summary({"predicted_iou": record["predicted_iou"],
                 **{f"next_click_{policy}": per_set[0] for policy, per_set in suggestions.items()
                    if policy in ("bald", "sam_entropy")}})
    return record


def check_prediction_inputs(image_path: str) -> None:
    """One line for an image file that does not exist (before any model is loaded)."""
    if not Path(image_path).is_file():
        raise PredictorError(f"{image_path}: no such image file")
