"""The fitted uncertainty on one new image and its prompts: ``UncertainPredictor``.

Built from a config and the run ids of the fitted parts (head, variance network, Laplace, fusion;
each optional), it runs the very steps of the batch pipeline on an image that was never cached:
``set_image`` preprocesses and encodes it as stage 3 does (the backbone's own preprocessor, the
float16 rounding of ``round_features``), ``predict`` builds the prompt-set record of the clicks
(``promptset.clicked_record``), the cache entry stage 3 would store (``entries.decoded_entry``),
the ``EvalSample`` the evaluation reads (``EvalSample.build``: prompt maps at the pipeline's
``gaussian_sigma``, logits clipped at ``training.logit_clip``) and runs the strategies that
``methods.STRATEGY_BUILDERS`` and ``methods.Refinement`` build for the evaluation. On a cached
sample its FRAME256 outputs equal the evaluation's (``tests/test_predictor.py``).

Usage::

    predictor = UncertainPredictor.from_config("config.yaml", run_id="v1")
    predictor.set_image("photo.jpg")
    prediction = predictor.predict(point_coords=[[120, 80], [40, 30]], point_labels=[1, 0])
    prediction.probability          # P x H x W: SAM's mask probability
    prediction.maps["laplace"]      # {"mutual_information": P x H x W, "total_entropy": ..., ...}
    x, y = suggest_click(prediction, "bald")   # where the next click helps most (ORIGINAL pixels)
    again = predictor.predict([[120, 80], [40, 30], [x, y]], [1, 0, 1],
                              mask_input=prediction.low_res_logits[0])   # SAM's mask prompt: raw_sam only

``mask_input`` (``predict``): FRAME256 low-res logits, the shape SAM's predictor takes; SAM decodes with
it, and only ``MASK_INPUT_METHODS`` run (``MASK_INPUT_REFUSALS`` says why the others cannot).

No method reads a ground truth: there is none here. The oracle ablations of the evaluation are not
offered.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml

from modules.cache.entries import decoded_entry, record_prompts
from modules.cache.sam_cache import CacheEntry
from modules.core.config import PipelineConfig, load_config
from modules.core.device import resolve_device
from modules.core.errors import PipelineError
from modules.core.frames import FRAME256
from modules.core.stage import RESOLVED_CONFIG_FILE
from modules.data.imageio import ImageReadError, read_image_rgb
from modules.data.promptset import (PromptSpec, clicked_promptset, clicked_record, frame256_to_pixels, point_width,
                                    to_frame256_points)
from modules.evaluation.methods import (SOURCE_NEEDS, STRATEGY_BUILDERS, Refinement, build_strategy,
                                        decoder_laplace_refusal)
from modules.evaluation.runs import ARTIFACT_FILES, Artifacts, RunIds, artifact_md5s, trained_head_runs
from modules.evaluation.scoreboard import upsample
from modules.interactive.click_policies import (CLICK_POLICIES, ClickPolicy, choose_at_random, choose_by_map,
                                                click_spacing)
from modules.interactive.simulation import later_output_policy
from modules.sam.base import BackboneError
from modules.sam.prompting import MULTIMASK_POLICIES, round_features
from modules.scoring.mask_quality import mask_scores
from modules.uncertainty.strategies import EvalSample, Strategy, StrategyOutput

log = logging.getLogger("pipeline.predictor")

#: The refinement method the predictor offers (the fusion module refining SAM's first pass).
REFINED = "refined"
#: Methods run when none are named (each only when its runs exist): cheap, one pass each.
DEFAULT_METHODS = ("raw_sam", "map_head", "laplace", "variance_network", REFINED)
#: Methods run only on request: they decode many perturbed prompts or encode augmented images.
ON_REQUEST_METHODS = ("prompt_perturbation", "tta")
#: Every method the predictor can run.
PREDICTOR_METHODS = (*DEFAULT_METHODS, *ON_REQUEST_METHODS)
#: The method whose probability is ``Prediction.probability`` (SAM's own mask, which its IoU rates).
MASK_METHOD = "raw_sam"
#: The record's split name for prompt sets a person gave.
INTERACTIVE_SPLIT = "interactive"
#: The methods a ``mask_input`` call runs: SAM's own entropy needs no fitted part. The head, Laplace,
#: variance network and fusion module were fitted on SAM outputs decoded without a mask prompt, and
#: prompt perturbation and TTA decode their own prompts or images without it.
MASK_INPUT_METHODS = ("raw_sam",)
#: Why a method is refused with a ``mask_input``, by method.
MASK_INPUT_REFUSALS = {
    **{name: "its fitted part was trained on SAM outputs decoded without a mask prompt, so its uncertainty "
             "would not be calibrated" for name in ("map_head", "laplace", "variance_network", REFINED)},
    **{name: "its extra decoder passes do not take the mask prompt, so its map would describe another "
             "prediction" for name in ON_REQUEST_METHODS},
}


class PredictorError(PipelineError):
    """A bad image, prompt or method for the predictor (one line naming it)."""


def method_needs(cfg: PipelineConfig, method: str) -> tuple[str, ...]:
    """Names of ``runs.ARTIFACT_FILES`` that ``method`` loads."""
    if method == REFINED:
        return ("fusion", *SOURCE_NEEDS[cfg.fusion.uncertainty_source])
    return STRATEGY_BUILDERS[method].needs


#: Config keys that shape what every fitted part reads (SAM's logits, the prompt maps, the clipped
#: head input): a run fitted under other values would get inputs it never saw, uncalibrated.
TRAINING_TIME_KEYS = ("sam.family", "sam.model_type", "sam.prompt_mode", "sam.multimask_policy",
                      "prompt_generation.gaussian_sigma", "prompt_generation.max_pairs", "training.logit_clip")


def _dotted(tree, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def check_fitted_under(cfg: PipelineConfig, runs: RunIds, method: str) -> None:
    """A ``PredictorError`` naming the file and key when a run ``method`` loads was fitted under other
    ``TRAINING_TIME_KEYS`` values than ``cfg`` has (read from the run's ``config.resolved.yaml``;
    a run without one is not checked)."""
    for name in method_needs(cfg, method):
        if name == "sam_checkpoint":
            continue
        path = ARTIFACT_FILES[name](cfg, runs).parent / RESOLVED_CONFIG_FILE
        try:
            recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        for key in TRAINING_TIME_KEYS:
            value = _dotted(recorded, key)
            if value is not None and value != cfg.section(key):
                raise PredictorError(f"{path}: the {name} run was fitted with {key}={value!r} but this config has "
                                     f"{cfg.section(key)!r}; predict with the config it was trained with")


def missing_artifact(cfg: PipelineConfig, runs: RunIds, method: str) -> Path | None:
    """The first file ``method`` needs that does not exist, else None."""
    for name in method_needs(cfg, method):
        path = ARTIFACT_FILES[name](cfg, runs)
        if name == "sam_checkpoint" and path.is_dir():
            continue
        if not path.is_file():
            return path
    return None


# --------------------------------------------------------------------------- outputs


@dataclass
class MethodPrediction:
    """One method's outputs at the image's resolution (``P`` prompt sets, ``H x W`` image).

    - ``probability``: ``P x H x W`` foreground probability; ``maps``: name -> ``P x H x W``
      (higher = more uncertain); upsampled from FRAME256 bilinearly, as the evaluation scores them.
    - ``primary_map``: the map that stands for the method (``StrategyOutput.primary_map``).
    - ``quality``: ``mask_quality.mask_scores`` columns (``band_uncertainty``,
      ``foreground_uncertainty``, ``expected_iou``) -> ``P`` float64, from ``primary_map``.
    - ``frame256``: the method's ``StrategyOutput`` (``P x 256 x 256``, CPU), what click policies read.
    """

    probability: torch.Tensor
    maps: dict[str, torch.Tensor]
    primary_map: str
    quality: dict[str, np.ndarray]
    frame256: StrategyOutput


@dataclass
class Prediction:
    """All methods' outputs for the ``P`` prompt sets of one ``predict`` call.

    - ``image_hw``: ``(H, W)``; ``record``: the prompt-set record (ORIGINAL pixels and FRAME256);
      ``entry``: the ``CacheEntry`` stage 3 would store for it (SAM's logits ``P x 256 x 256``).
    - ``predicted_iou``: ``P`` float32, SAM's predicted IoU of the output it kept.
    - ``multimask_policy``: the ``sam.multimask_policy`` name of the output kept.
    - ``methods``: method name -> ``MethodPrediction``.
    """

    image_hw: tuple[int, int]
    record: dict
    entry: CacheEntry
    predicted_iou: np.ndarray
    multimask_policy: str
    methods: dict[str, MethodPrediction] = field(default_factory=dict)

    @property
    def probability(self) -> torch.Tensor:
        """``P x H x W``: SAM's mask probability (the mask ``predicted_iou`` rates)."""
        return self.methods[MASK_METHOD].probability

    @property
    def maps(self) -> dict[str, dict[str, torch.Tensor]]:
        """method -> map name -> ``P x H x W``."""
        return {name: output.maps for name, output in self.methods.items()}

    @property
    def quality(self) -> dict[str, dict[str, np.ndarray]]:
        """method -> quality column -> ``P`` (``mask_quality.QUALITY_SCORES``)."""
        return {name: output.quality for name, output in self.methods.items()}

    @property
    def num_promptsets(self) -> int:
        return len(self.record["promptsets"])

    @property
    def low_res_logits(self) -> np.ndarray:
        """``P x 256 x 256`` float32: SAM's logits of the output it kept, FRAME256 (float16-rounded, as
        stage 3 caches them); pass one row back as the next call's ``mask_input``."""
        return np.asarray(self.entry.logits, dtype=np.float32)

    def clicks(self, index: int) -> np.ndarray:
        """``N x 2`` (x, y) ORIGINAL pixels of prompt set ``index``'s points."""
        return np.asarray(self.record["promptsets"][index]["points"], dtype=np.float64).reshape(-1, 2)


# --------------------------------------------------------------------------- the predictor


class UncertainPredictor:
    """SAM and the fitted uncertainty methods on one image at a time (see the module docstring).

    Args:
        cfg: the pipeline config the runs were trained with (its ``sam``, ``prompt_generation``,
            ``training``, ``laplace``, ``variance``, ``fusion`` and ``evaluation`` settings apply).
        runs: the fitted runs (``RunIds.resolve("v1")``).
        methods: names of ``PREDICTOR_METHODS`` to run; None: every ``DEFAULT_METHODS`` entry whose
            runs exist (the others are skipped with a log line; when none has its run but the project
            holds other head runs, a ``PredictorError`` listing them). A named method whose run is
            missing is a ``PredictorError`` naming the file.
        device: where the head, posterior, variance and fusion networks run (default
            ``training.device``); the backbone runs on ``sam.device``.
    """

    def __init__(self, cfg: PipelineConfig, runs: RunIds, methods: Sequence[str] | None = None,
                 device: str | torch.device | None = None) -> None:
        self.cfg, self.runs = cfg, runs
        device = resolve_device(device if device is not None else cfg.training.device, key="training.device")
        self.artifacts = Artifacts(cfg, runs, device)
        self.methods = self._available_methods(methods)
        self._strategies: dict[tuple[str, str], Strategy] = {}
        self._refinement: Refinement | None = None
        self._image: np.ndarray | None = None
        self._image_id = ""
        self._features: dict[str, torch.Tensor] | None = None
        self._input_hw: tuple[int, int] = (0, 0)
        pg = cfg.prompt_generation
        self.point_width = point_width(PromptSpec(pg.min_pairs, pg.max_pairs, pg.prompt_seed, pg.gaussian_sigma,
                                                  pg.box_jitter))

    @classmethod
    def from_config(cls, config: str | Path, run_id: str = "v1", overrides: Sequence[str] = (),
                    methods: Sequence[str] | None = None, **run_overrides: str | None) -> "UncertainPredictor":
        """The predictor of a config file (``--set``-style ``overrides``) and its runs (``run_id`` for
        all; ``head=``, ``variance=``, ``laplace=``, ``fusion=`` override one each)."""
        cfg = load_config(config, list(overrides))
        return cls(cfg, RunIds.resolve(run_id, **run_overrides), methods)

    def _available_methods(self, requested: Sequence[str] | None) -> list[str]:
        if requested is not None:
            unknown = [name for name in requested if name not in PREDICTOR_METHODS]
            if unknown:
                raise PredictorError(f"methods: unknown {unknown} (known: {', '.join(PREDICTOR_METHODS)})")
            for name in requested:
                path = missing_artifact(self.cfg, self.runs, name)
                if path is not None:
                    raise PredictorError(f"{path}: missing, needed by the method {name!r}; run its stage first "
                                         "(or pick other run ids)")
            chosen = list(dict.fromkeys(requested))
        else:
            chosen = []
            for name in DEFAULT_METHODS:
                path = missing_artifact(self.cfg, self.runs, name)
                if path is None:
                    chosen.append(name)
                else:
                    log.info("[predictor] %s skipped: %s is missing", name, path)
            trained = trained_head_runs(self.cfg) if chosen in ([], [MASK_METHOD]) else []
            if trained:  # none of the runs exists, other runs do: a mistyped run id, not "SAM alone"
                raise PredictorError(f"{self.runs}: no fitted method has its run there ({self.cfg.project_root} "
                                     f"holds the head runs {', '.join(trained)}); pick one of those (--run_id), "
                                     "or ask for SAM alone (methods raw_sam)")
        if MASK_METHOD not in chosen:
            chosen.insert(0, MASK_METHOD)  # SAM's own mask is always there
        for name in chosen:
            check_fitted_under(self.cfg, self.runs, name)
        # A damaged checkpoint or posterior (a zip member failing its CRC) is one line, as in stage 7.
        artifact_md5s(self.cfg, self.runs, {need for name in chosen for need in method_needs(self.cfg, name)
                                            if need != "sam_checkpoint"})
        return chosen

    def _strategy(self, method: str, multimask_policy: str) -> Strategy:
        """``method``'s strategy for prompt sets decoded with ``multimask_policy`` (prompt perturbation
        and TTA decode again and keep that output too)."""
        key = (method, multimask_policy)
        if key not in self._strategies:
            self._strategies[key] = build_strategy(method, self.cfg, self.artifacts, multimask_policy)
        return self._strategies[key]

    @property
    def backbone(self):
        return self.artifacts.backbone

    # ----------------------------------------------------------- the image

    def set_image(self, image: np.ndarray | str | Path, image_id: str | None = None) -> None:
        """Preprocess and encode one image (``H x W x 3`` uint8 RGB, or a file ``read_image_rgb``
        reads) as stage 3 does, and keep its float16-rounded features for every ``predict``.

        ``image_id`` names the image and seeds the stochastic methods (as a sample id does in the
        evaluation); default: the file's stem, or an md5 of the pixels.
        """
        if isinstance(image, (str, Path)):
            try:
                pixels = read_image_rgb(image)
            except ImageReadError as exc:
                raise PredictorError(str(exc)) from None
            image_id = image_id or Path(image).stem
        else:
            pixels = image
        backbone = self.backbone
        try:
            prepared = backbone.preprocessor.prepare(pixels)
        except BackboneError as exc:
            raise PredictorError(f"image: {exc}") from None
        image_id = image_id or "image-" + hashlib.md5(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:12]
        with torch.inference_mode():
            encoder_input = backbone.preprocessor.finish([prepared], backbone.device)
            self._features = round_features(backbone.encode(encoder_input))
        self._image = pixels
        self._image_id = image_id
        self._input_hw = tuple(int(v) for v in backbone.preprocessor.input_size(pixels.shape[:2]))

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            raise PredictorError("predictor: call set_image before predict")
        return self._image

    @property
    def image_hw(self) -> tuple[int, int]:
        return (int(self.image.shape[0]), int(self.image.shape[1]))

    # ----------------------------------------------------------- prompts

    def promptset(self, points, labels, box, index: int) -> dict:
        """One checked ``clicked_promptset``: points ``N x 2`` (x, y) and the box inside the image."""
        height, width = self.image_hw
        try:
            points = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
            labels = np.ones(len(points), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
            box = None if box is None else np.asarray(box, dtype=np.float64).reshape(4)
        except (TypeError, ValueError) as exc:
            raise PredictorError(f"prompt set {index}: points must be N x 2 numbers (x, y), labels N values "
                                 f"and the box 4 numbers ({exc})") from None
        for x, y in points:
            if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
                raise PredictorError(f"point ({x:g}, {y:g}) of prompt set {index} is outside the {width} x {height} "
                                     "image (x in 0..W-1, y in 0..H-1)")
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (0 <= x0 <= x1 <= width - 1 and 0 <= y0 <= y1 <= height - 1):
                raise PredictorError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) of prompt set {index} is not "
                                     f"x0 <= x1, y0 <= y1 inside the {width} x {height} image")
        mode = self.cfg.sam.prompt_mode
        if mode != "box" and len(points) == 0:
            raise PredictorError(f"prompt set {index}: no point, and sam.prompt_mode is {mode!r} (give a point)")
        if mode == "box" and box is None:
            raise PredictorError(f"prompt set {index}: no box, and sam.prompt_mode is 'box' (give a box)")
        try:
            return clicked_promptset(points, labels, box, height, width, promptset_id=index)
        except ValueError as exc:
            raise PredictorError(f"prompt set {index}: {exc}") from None

    def record(self, promptsets: Sequence[dict]) -> dict:
        """The prompt-set record of ``clicked_promptset`` sets, as stage 2 would write it."""
        return clicked_record(self._image_id, self._image_id, self.image_hw, list(promptsets),
                              self.cfg.prompt_generation.gaussian_sigma, self.point_width, split=INTERACTIVE_SPLIT)

    # ----------------------------------------------------------- prediction

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                methods: Sequence[str] | None = None, multimask_policy: str | None = None) -> Prediction:
        """SAM's mask and every method's uncertainty for ``P`` prompt sets at once.

        Args:
            point_coords: ``N x 2`` (x, y) ORIGINAL pixels (one prompt set) or ``P x N x 2``.
            point_labels: ``N`` or ``P x N`` (1 positive, 0 negative); default all positive.
            box: ``4`` (x0, y0, x1, y1) inclusive ORIGINAL pixels, or ``P x 4``; None: no box.
            mask_input: ``256 x 256`` (one prompt set) or ``P x 256 x 256`` low-res logits, as SAM's
                ``SamPredictor.predict`` takes them (``1 x 256 x 256`` there), but in FRAME256, the
                project's frame (``sam.base``: the image stretched to 256 x 256, whatever the family):
                an earlier ``Prediction.low_res_logits`` row is one. SAM v1's own low-res logits (its
                padded frame) go through ``backbone.to_frame256`` first. Only ``MASK_INPUT_METHODS``
                run with one: naming another method is a ``PredictorError`` saying why
                (``MASK_INPUT_REFUSALS``); by default the others are left out.
            methods: a subset of the predictor's methods (default all of them).
            multimask_policy: the decoder output every prompt set keeps, a ``sam.multimask_policy``
                name; default the config's, which stage 3 cached and the head was trained on.
                ``"single"`` is SAM's single-mask output, the only one SAM and SAM 2 return for more
                than one prompt; ``later_output`` is what the click simulation keeps from the second
                click on.
        """
        try:
            points = None if point_coords is None else np.asarray(point_coords, dtype=np.float64)
        except ValueError as exc:
            raise PredictorError(f"point_coords: not an N x 2 or P x N x 2 array ({exc}); prompt sets with "
                                 "different point counts go through predict_sets") from None
        batched = (points is not None and points.ndim == 3) or (box is not None and np.asarray(box).ndim == 2)
        if not batched:
            return self.predict_sets([{"points": points, "labels": point_labels, "box": box}], methods, mask_input,
                                     multimask_policy)
        count = len(points) if points is not None else len(box)
        sets = []
        for index in range(count):
            sets.append({"points": None if points is None else points[index],
                         "labels": None if point_labels is None else np.asarray(point_labels)[index],
                         "box": None if box is None else np.asarray(box)[index]})
        return self.predict_sets(sets, methods, mask_input, multimask_policy)

    def predict_sets(self, promptsets: Sequence[dict], methods: Sequence[str] | None = None,
                     mask_input=None, multimask_policy: str | None = None) -> Prediction:
        """``predict`` for a list of prompt sets, each ``{"points": N x 2, "labels": N, "box": 4 or
        None}`` (their point counts may differ): one decoder call for all of them."""
        if not promptsets:
            raise PredictorError("prompts: no prompt set given")
        record = self.record([self.promptset(s.get("points"), s.get("labels"), s.get("box"), index)
                              for index, s in enumerate(promptsets)])
        return self.predict_record(record, methods, mask_input, multimask_policy)

    def predict_record(self, record: dict, methods: Sequence[str] | None = None, mask_input=None,
                       multimask_policy: str | None = None) -> Prediction:
        """The prediction for a prompt-set record of this image (``clicked_record``, or stage 2's);
        ``mask_input`` and ``multimask_policy`` as in ``predict``."""
        chosen = self.methods if methods is None else list(methods)
        unknown = [name for name in chosen if name not in self.methods]
        if unknown:
            raise PredictorError(f"methods: {unknown} not loaded by this predictor (it runs {self.methods})")
        if self._features is None:
            raise PredictorError("predictor: call set_image before predict")
        policy = self._checked_policy(multimask_policy, chosen)
        masks = None
        if mask_input is not None:
            masks = checked_mask_input(mask_input, len(record["promptsets"]))
            chosen = mask_input_methods(chosen, explicit=methods is not None)
        image = self.image
        cfg = self.cfg
        with torch.inference_mode():
            prompts, promptset_ids = record_prompts(record)
            entry = decoded_entry(self.backbone, self._features, self.image_hw, self._input_hw, prompts, promptset_ids,
                                  cfg.sam.prompt_mode, policy, str(record["safe_id"]),
                                  str(record["split"]), mask_input=masks)
            sample = EvalSample.build(str(record["safe_id"]), INTERACTIVE_SPLIT, entry, record, cfg.training.logit_clip,
                                      image_loader=lambda: image)
            outputs = self.frame256_outputs(sample, chosen, policy)
            prediction = Prediction(self.image_hw, record, entry, entry.selected_iou_predictions, policy)
            for name, output in outputs.items():
                prediction.methods[name] = self._at_image_size(output)
        return prediction

    def _checked_policy(self, multimask_policy: str | None, methods: Sequence[str]) -> str:
        """``multimask_policy`` (default ``sam.multimask_policy``), or a one-line ``PredictorError``
        for an unknown name or one the SAM-decoder Laplace was not fitted on (its posterior is per
        mask token)."""
        configured = self.cfg.sam.multimask_policy
        policy = configured if multimask_policy is None else multimask_policy
        if policy not in MULTIMASK_POLICIES:
            raise PredictorError(f"multimask_policy: {policy!r} is not one of {', '.join(MULTIMASK_POLICIES)}")
        refusal = decoder_laplace_refusal(self.cfg, policy) if "laplace" in methods else None
        if refusal:
            raise PredictorError(f"multimask_policy: {refusal}; leave out the method laplace or the multimask_policy")
        return policy

    @property
    def later_output(self) -> str:
        """The ``multimask_policy`` the click simulation keeps from the second click on
        (``evaluation.active_prompting.later_output``): pass it to ``predict`` once a prompt set holds
        more than one prompt to correct a mask as the simulation does."""
        return later_output_policy(self.cfg)

    def frame256_outputs(self, sample: EvalSample, methods: Sequence[str],
                         multimask_policy: str | None = None) -> dict[str, StrategyOutput]:
        """Each method's ``StrategyOutput`` (FRAME256, moved to the CPU) for one ``EvalSample`` decoded
        with ``multimask_policy`` (default ``sam.multimask_policy``)."""
        policy = multimask_policy or self.cfg.sam.multimask_policy
        outputs = {name: self._strategy(name, policy).predict(sample) for name in methods if name != REFINED}
        if REFINED in methods:
            if self._refinement is None:
                self._refinement = Refinement(self.cfg, self.artifacts)
            outputs[REFINED] = self._refinement.predict(self._refinement.shared_inputs(sample))[REFINED]
        return {name: StrategyOutput(outputs[name].mean_prob.cpu(),
                                     {key: value.cpu() for key, value in outputs[name].maps.items()},
                                     outputs[name].primary_map)
                for name in methods}

    def _at_image_size(self, output: StrategyOutput) -> MethodPrediction:
        size, cpu = self.image_hw, torch.device("cpu")
        probability = upsample(output.mean_prob, size, cpu).clamp_(0.0, 1.0)
        maps = {name: upsample(values, size, cpu) for name, values in output.maps.items()}
        rows = mask_scores(probability, maps[output.primary_map], self.cfg.evaluation.mask_quality_band)
        quality = {column: np.array([row[column] for row in rows], dtype=np.float64) for column in rows[0]}
        return MethodPrediction(probability, maps, output.primary_map, quality, output)


def checked_mask_input(mask_input, num_promptsets: int) -> torch.Tensor:
    """``mask_input`` (``256 x 256``, ``P x 256 x 256`` or ``P x 1 x 256 x 256`` finite logits, FRAME256)
    as the decoder's ``P x 1 x 256 x 256`` float32; a ``PredictorError`` naming ``mask_input`` otherwise."""
    try:
        masks = torch.as_tensor(np.asarray(mask_input, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise PredictorError(f"mask_input: not an array of logits ({exc})") from None
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    expected = (num_promptsets, FRAME256, FRAME256)
    if tuple(masks.shape) != expected:
        raise PredictorError(f"mask_input: need {FRAME256} x {FRAME256} or P x {FRAME256} x {FRAME256} low-res "
                             f"logits (FRAME256) for the P = {num_promptsets} prompt sets, got shape "
                             f"{tuple(np.shape(mask_input))}")
    if not bool(torch.isfinite(masks).all()):
        raise PredictorError("mask_input: holds NaN or infinite logits")
    return masks.unsqueeze(1)


def mask_input_methods(methods: Sequence[str], explicit: bool) -> list[str]:
    """The methods a ``mask_input`` call runs: ``methods`` that are ``MASK_INPUT_METHODS``. A method
    named by the caller (``explicit``) that is not one is a ``PredictorError`` saying why."""
    refused = [name for name in methods if name not in MASK_INPUT_METHODS]
    if refused and explicit:
        name = refused[0]
        raise PredictorError(f"mask_input: the method {name!r} cannot run with a mask prompt: "
                             f"{MASK_INPUT_REFUSALS[name]} (with mask_input only {', '.join(MASK_INPUT_METHODS)} "
                             "runs; or pass every click instead of the mask)")
    return [name for name in methods if name in MASK_INPUT_METHODS]


# --------------------------------------------------------------------------- the next click


def policy_map(prediction: Prediction, policy: str, index: int = 0) -> np.ndarray:
    """The FRAME256 map ``256 x 256`` a policy takes the argmax of, for prompt set ``index``."""
    chosen = suggestable_policy(policy)
    if chosen.kind != "map":
        raise PredictorError(f"click policy {policy!r} reads no map")
    if chosen.strategy not in prediction.methods:
        raise PredictorError(f"click policy {policy!r} needs the method {chosen.strategy!r}, which this prediction "
                             f"lacks (it has {', '.join(prediction.methods)})")
    return chosen.map_of(prediction.methods[chosen.strategy].frame256)[index].numpy()


def suggestable_policy(policy: str) -> ClickPolicy:
    """The ``CLICK_POLICIES`` entry of ``policy``; the oracle needs the ground truth, which a
    prediction never has, so it is not one."""
    suggestable = [name for name, entry in CLICK_POLICIES.items() if not entry.reads_ground_truth]
    if policy not in suggestable:
        raise PredictorError(f"click policy: unknown {policy!r} (known: {', '.join(suggestable)})")
    return CLICK_POLICIES[policy]


def suggest_click(prediction: Prediction, policy: str = "bald", index: int = 0,
                  previous: Sequence[Sequence[float]] | None = None, min_distance: str | float = "auto",
                  seed: int = 0) -> tuple[int, int] | None:
    """The next click ``(x, y)`` in ORIGINAL pixels for prompt set ``index``, or None when every pixel
    is blocked.

    The policy (``CLICK_POLICIES``) chooses on the FRAME256 map (``click_policies.choose_by_map``, or
    ``choose_at_random`` seeded by ``seed``) and the chosen cell is mapped back to the image
    (``promptset.frame256_to_pixels``). ``previous``: ``K x 2`` (x, y) ORIGINAL pixels never to choose
    again (default: the prompt set's own points); their FRAME256 cells, and with ``min_distance``
    (FRAME256 pixels; ``auto``: two of the prompt maps' sigmas, ``click_policies.click_spacing``, as
    the click simulation's default) every cell closer than that, are blocked, and so is a cell that
    lands on a previous pixel (an image smaller than 256 maps several cells to one pixel).
    """
    spacing = click_spacing(min_distance, float(prediction.record["gaussian_sigma"]))
    height, width = prediction.image_hw
    previous_px = prediction.clicks(index) if previous is None else np.asarray(previous, np.float64).reshape(-1, 2)
    taken = {(int(round(x)), int(round(y))) for x, y in previous_px}
    cells_256 = np.clip(np.rint(to_frame256_points(previous_px, height, width)), 0, FRAME256 - 1).astype(int)
    blocked = [(int(row), int(col)) for col, row in cells_256]
    score_map = policy_map(prediction, policy, index) if suggestable_policy(policy).kind == "map" else None
    rng = np.random.default_rng(seed)
    while True:
        if score_map is None:
            choice = choose_at_random((FRAME256, FRAME256), blocked, rng, spacing)
        else:
            choice = choose_by_map(score_map, blocked, spacing)
        if choice is None:
            return None
        x, y = frame256_to_pixels(np.array([[choice.col, choice.row]]), height, width)[0]
        if (int(x), int(y)) not in taken:
            return int(x), int(y)
        blocked.append((choice.row, choice.col))
