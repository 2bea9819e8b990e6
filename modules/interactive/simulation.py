"""Simulated interactive segmentation: click policies against a simulated annotator, on cached embeddings.

A batch of ``B`` images at a time (``ClickSimulator.simulate_batch``, ``B`` =
``evaluation.active_prompting.batch_images``; ``simulate`` is the batch of one): in every image every
configured policy starts from the same first interaction (the error oracle's first click, at the
object's interior point farthest from its boundary; or the object's tight box), then up to
``max_clicks`` rounds of: every policy of every image chooses its next click, then

1. per image, one decoder call on its cached encoder features (no encoder pass) for the ``P``
   lanes' click histories at once, each history one prompt set (``cache.entries.decoded_entry``,
   the step stage 3 caches), giving the very ``CacheEntry`` stage 3 would have cached for those
   clicks. A random policy runs ``random_draws`` times (``Lane``: a policy and a draw, one prompt set
   each), so the report can average over its luck; every other policy is one lane. With
   ``mask_prompt: previous``, from the second round on each prompt set also gives SAM its own
   low-res logits of the round before as a mask prompt, as SAM's interactive protocol does (SAM was
   trained to correct its last mask with the new click); ``none`` (the default) decodes the clicks
   alone. The first round keeps the output stage 3 keeps (``sam.multimask_policy``); with
   ``later_output: single`` (``auto`` on SAM, SAM 2 and SAM 3 checkpoints) every later round keeps
   SAM's single-mask output, the only one SAM returns for more than one prompt, and the strategies
   that decode again (prompt perturbation) keep it too. SAM's mask decoder takes one image's
   embedding per call (it repeats it over the prompt sets), so the decoder runs image by image (each
   image's prompt sets in calls of at most ``sam.decoder_batch``, ``Backbone.decode``);
2. the strategies the policies and the predicted mask need (``evaluation.methods.STRATEGY_BUILDERS``:
   head, Laplace, variance network, prompt perturbation, raw SAM) on those entries, each only on the
   prompt sets that read it, through ``Strategy.predict_batch``: one pass over the ``B`` images'
   rows where the strategy's work does not depend on the image (raw SAM, the head's convolutions,
   the closed-form Laplace), image by image otherwise; bit for bit what ``B = 1`` gives
   (``tests/test_click_simulation.py``);
3. per policy: the IoU of its mask (``mask_method``'s probability > 0.5 at the image's resolution),
   the mask-level uncertainty (``quality``: the mean of ``mask_method``'s primary map in the band
   around the mask's boundary, ``scoring.mask_quality.mask_scores``), SAM's predicted IoU; then its
   next click.

Choices are made at the image's resolution (the maps upsampled bilinearly, as the evaluation scores
them), so clicks, ``min_distance`` and the never-click-twice rule are all in ORIGINAL pixels
(``min_distance`` binds every policy but the oracle, which follows the reference protocol). An
uncertainty policy is handed its map alone (``choose_by_map``), never the ground truth; the simulated
annotator (``Annotator``) answers each of its clicks with the ground-truth label of that pixel. Only
the ``oracle`` policy reads the ground truth to choose (``choose_by_error_oracle``).

The result is the click trace (``TRACE_COLUMNS``, one row per image, lane and click count) that
``interactive.click_metrics`` turns into IoU-vs-clicks curves, NoC and the stop signal's AUROC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch

from modules.cache.entries import decoded_entry, record_prompts
from modules.cache.sam_cache import CacheEntry
from modules.core.config import PipelineConfig
from modules.core.errors import PipelineError
from modules.data.promptset import clicked_promptset, clicked_record, sample_key, tight_box
from modules.evaluation.methods import STRATEGY_BUILDERS, build_strategy, decoder_laplace_refusal
from modules.evaluation.runs import Artifacts
from modules.evaluation.samples import EvalUnit, LabelledSample
from modules.evaluation.scoreboard import upsample
from modules.interactive.click_metrics import TRACE_COLUMNS
from modules.interactive.click_policies import (CLICK_POLICIES, ClickChoice, ClickPolicy, annotator_label,
                                                choose_at_random, choose_by_error_oracle, choose_by_map,
                                                click_spacing)
from modules.sam.registry import MULTIMASK_TRAINED_ON_SEVERAL_PROMPTS
from modules.scoring.common import PROB_THRESHOLD
from modules.scoring.mask_quality import mask_scores
from modules.uncertainty.strategies import EvalSample, Strategy, StrategyOutput

SETTINGS_KEY = "evaluation.active_prompting"
#: ``start: box`` decodes clicks and box together; ``start: point`` clicks only.
START_PROMPT_MODES = {"point": "points", "box": "points_and_box"}


class SimulationError(PipelineError):
    """A bad ``evaluation.active_prompting`` setting (the message names the key)."""


def checked_policies(cfg: PipelineConfig) -> dict[str, ClickPolicy]:
    """The configured policies in config order, and a one-line error naming the key for an unknown
    policy, a duplicate, or an unknown ``mask_method``."""
    settings = cfg.evaluation.active_prompting
    names = list(settings.policies)
    unknown = [name for name in names if name not in CLICK_POLICIES]
    if unknown or not names or len(set(names)) != len(names):
        raise SimulationError(f"{SETTINGS_KEY}.policies: need distinct names of {', '.join(CLICK_POLICIES)}, "
                              f"got {names}")
    if settings.mask_method not in STRATEGY_BUILDERS:
        raise SimulationError(f"{SETTINGS_KEY}.mask_method: {settings.mask_method!r} is not one of "
                              f"{', '.join(STRATEGY_BUILDERS)}")
    return {name: CLICK_POLICIES[name] for name in names}


@dataclass(frozen=True)
class Lane:
    """One simulated run of a policy on an image: the policy and its draw (0 .. ``random_draws`` - 1
    for a random policy, 0 for every other). Each lane is one prompt set of every decoder call."""

    policy: str
    draw: int = 0


def simulation_lanes(cfg: PipelineConfig) -> list[Lane]:
    """The lanes in trace order: the policies in config order, a random one followed by its draws."""
    draws = int(cfg.evaluation.active_prompting.random_draws)
    return [Lane(name, draw) for name, policy in checked_policies(cfg).items()
            for draw in range(draws if policy.kind == "random" else 1)]


def needed_strategies(cfg: PipelineConfig) -> list[str]:
    """The strategies the simulation runs: ``mask_method`` first, then those the policies read."""
    policies = checked_policies(cfg)
    names = [cfg.evaluation.active_prompting.mask_method]
    names += [policy.strategy for policy in policies.values() if policy.strategy is not None]
    return list(dict.fromkeys(names))


def later_output_policy(cfg: PipelineConfig) -> str:
    """The ``sam.multimask_policy`` the decoder keeps from the second interaction on
    (``evaluation.active_prompting.later_output``; ``auto``: ``as_first`` for the backbones of
    ``MULTIMASK_TRAINED_ON_SEVERAL_PROMPTS``, else ``single``), and a one-line error where the
    SAM-decoder Laplace would read an output its posterior was not fitted on (it is per mask token)."""
    first = cfg.sam.multimask_policy
    setting = cfg.evaluation.active_prompting.later_output
    if setting == "auto":
        trained = (cfg.sam.family, cfg.sam.model_type) in MULTIMASK_TRAINED_ON_SEVERAL_PROMPTS
        setting = "as_first" if trained else "single"
    later = first if setting == "as_first" else "single"
    refusal = decoder_laplace_refusal(cfg, later) if "laplace" in needed_strategies(cfg) else None
    if refusal:
        raise SimulationError(
            f"{SETTINGS_KEY}.later_output: {cfg.evaluation.active_prompting.later_output!r} keeps SAM's "
            f"single-mask output from the second click on, and {refusal}; set {SETTINGS_KEY}.later_output: "
            "as_first")
    return later


def simulation_artifacts(cfg: PipelineConfig) -> set[str]:
    """Names of ``evaluation.runs.ARTIFACT_FILES`` the simulation loads (none when it is disabled);
    checks the settings up front."""
    if not cfg.evaluation.active_prompting.enabled:
        return set()
    later_output_policy(cfg)
    names = {"sam_checkpoint"}
    for strategy in needed_strategies(cfg):
        names.update(STRATEGY_BUILDERS[strategy].needs)
    return names


def simulated_units(units: list[EvalUnit], limit: int) -> list[EvalUnit]:
    """The units the simulation runs on, in unit order: all (``limit`` 0), else ``limit`` of them taken
    round-robin over the groups (so seen and unseen groups are both simulated)."""
    if not limit or limit >= len(units):
        return list(units)
    queues: dict[str, list[EvalUnit]] = {}
    for unit in units:
        queues.setdefault(unit.group, []).append(unit)
    chosen: set[str] = set()
    while len(chosen) < limit:
        for queue in queues.values():
            if queue and len(chosen) < limit:
                chosen.add(queue.pop(0).safe_id)
    return [unit for unit in units if unit.safe_id in chosen]


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two ``H x W`` bool masks (1.0 when both are empty, as ``scoring.segmentation``)."""
    union = int(np.count_nonzero(predicted | truth))
    return 1.0 if union == 0 else int(np.count_nonzero(predicted & truth)) / union


@dataclass
class Annotator:
    """The simulated person: the ground truth ``H x W`` bool at ORIGINAL resolution. ``label`` answers
    a lane's click (the only ground truth an uncertainty policy's run receives), ``first_click`` is the
    oracle's first click (the object's most interior pixel), ``box`` the object's tight box."""

    truth: np.ndarray

    def label(self, lane: Lane, choice: ClickChoice) -> int:
        return annotator_label(self.truth, choice)

    def first_click(self) -> ClickChoice:
        choice = choose_by_error_oracle(np.zeros_like(self.truth), self.truth, [])
        if choice is None:  # an empty mask: the oracle clicks the image centre, as background
            height, width = self.truth.shape
            return ClickChoice(height // 2, width // 2, 0)
        return choice

    def box(self) -> list[int] | None:
        return list(tight_box(self.truth)) if self.truth.any() else None


@dataclass
class ClickHistory:
    """One policy's interactions: clicks ``(row, col)`` in ORIGINAL pixels and their labels."""

    clicks: list[tuple[int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    stopped: bool = False

    def add(self, choice: ClickChoice, label: int) -> None:
        if (choice.row, choice.col) in self.clicks:
            raise AssertionError(f"click ({choice.row}, {choice.col}) placed twice")
        self.clicks.append((choice.row, choice.col))
        self.labels.append(int(label))


def subset_sample(sample: EvalSample, indices: list[int], logit_clip: float) -> EvalSample:
    """The ``EvalSample`` of some of ``sample``'s prompt sets (``indices``), for a strategy only some
    policies read."""
    if indices == list(range(sample.num_promptsets)):
        return sample
    entry = sample.cache_entry
    rows = np.asarray(indices, dtype=np.int64)
    part = CacheEntry(entry.safe_id, entry.split, entry.features, entry.logits[rows], entry.promptset_ids[rows],
                      entry.branch_index[rows], entry.iou_predictions[rows], entry.original_hw, entry.input_hw,
                      entry.promptset_md5)
    record = {**sample.record, "promptsets": [sample.record["promptsets"][i] for i in indices]}
    return EvalSample.build(sample.safe_id, sample.group, part, record, logit_clip, sample.image_loader)


@dataclass
class ImageRun:
    """One image's simulation state: the lanes' histories, the last round's outputs (``L x 256 x
    256`` FRAME256 per strategy, one row per lane), masks (``L x H x W`` bool) and SAM's own logits
    (the next round's mask prompt), the trace rows so far per lane."""

    sample: EvalSample
    annotator: Annotator
    unseen: bool
    lanes: list[Lane]
    features: dict[str, torch.Tensor]
    histories: dict[Lane, ClickHistory]
    rngs: dict[Lane, np.random.Generator]
    box: list[int] | None
    placed: dict[Lane, tuple[int, int, int]] = field(default_factory=dict)
    outputs: dict[str, StrategyOutput] = field(default_factory=dict)
    predicted: np.ndarray | None = None
    rows: dict[Lane, list[dict]] = field(default_factory=dict)
    low_res_logits: torch.Tensor | None = None  # L x 1 x 256 x 256: SAM's logits of the last round

    def __post_init__(self) -> None:
        self.rows = {lane: [] for lane in self.lanes}


class ClickSimulator:
    """Runs the configured policies (``evaluation.active_prompting``) on a batch of images at a time."""

    def __init__(self, cfg: PipelineConfig, artifacts: Artifacts) -> None:
        settings = cfg.evaluation.active_prompting
        self.cfg = cfg
        self.policies = checked_policies(cfg)
        self.lanes = simulation_lanes(cfg)
        self.max_clicks = int(settings.max_clicks)
        self.min_distance = settings.min_distance  # "auto" or pixels: click_spacing, per image
        self.start_with = settings.start
        self.mask_prompt = settings.mask_prompt
        self.mask_method = settings.mask_method
        self.seed = int(settings.seed)
        self.backbone = artifacts.backbone
        self.strategies = {name: build_strategy(name, cfg, artifacts) for name in needed_strategies(cfg)}
        # From the second interaction on: the decoder output kept, and the strategies that decode
        # again (prompt perturbation) built for that output.
        self.later_policy = later_output_policy(cfg)
        self.later_strategies = self.strategies
        if self.later_policy != cfg.sam.multimask_policy:
            self.later_strategies = {name: build_strategy(name, cfg, artifacts, self.later_policy)
                                     for name in self.strategies}
        self.readers: dict[str, list[int]] = {name: [] for name in self.strategies}
        for index, lane in enumerate(self.lanes):
            strategy = self.policies[lane.policy].strategy
            if strategy is not None:
                self.readers[strategy].append(index)
        self.readers[self.mask_method] = list(range(len(self.lanes)))

    def simulate(self, labelled: LabelledSample, unseen: bool, annotator: Annotator | None = None) -> pd.DataFrame:
        """The trace (``TRACE_COLUMNS``) of one image: ``len(lanes) * max_clicks`` rows, lane by lane
        (policies in config order, a random one's draws after it), clicks ascending. ``annotator``:
        default the sample's ground truth."""
        return self.simulate_batch([labelled], [unseen], None if annotator is None else [annotator])[0]

    def simulate_batch(self, batch: list[LabelledSample], unseen: list[bool],
                       annotators: list[Annotator] | None = None) -> list[pd.DataFrame]:
        """The traces of ``B`` images simulated together (one round for all of them at a time), each
        equal to ``simulate`` of that image alone."""
        runs = [self.start(labelled, flag, None if annotators is None else annotators[index])
                for index, (labelled, flag) in enumerate(zip(batch, unseen))]
        for clicks in range(1, self.max_clicks + 1):
            if clicks > 1:
                for run in runs:
                    self.choose(run)
            self.score_batch(runs)
        return [pd.DataFrame([row for lane in run.lanes for row in run.rows[lane]], columns=list(TRACE_COLUMNS))
                for run in runs]

    def start(self, labelled: LabelledSample, unseen: bool, annotator: Annotator | None = None) -> "ImageRun":
        """One image's run with its first interaction placed (not yet scored)."""
        sample = labelled.inputs
        annotator = annotator or Annotator(labelled.ground_truth)
        lanes = list(self.lanes)
        run = ImageRun(sample, annotator, bool(unseen), lanes,
                       features={name: torch.from_numpy(np.asarray(value)).unsqueeze(0).to(self.backbone.device)
                                 for name, value in sample.cache_entry.features.items()},
                       histories={lane: ClickHistory() for lane in lanes},
                       rngs={lane: self.lane_rng(sample.sample_id, lane) for lane in lanes},
                       box=annotator.box() if self.start_with == "box" else None)
        if run.box is None:
            first = annotator.first_click()
            for lane in lanes:
                run.histories[lane].add(first, first.label)
                run.placed[lane] = (first.col, first.row, int(first.label))
        else:
            run.placed = {lane: (-1, -1, -1) for lane in lanes}
        return run

    def lane_rng(self, sample_id: str, lane: Lane) -> np.random.Generator:
        """A lane's generator, seeded by the image, the policy's name and the draw (not by places in
        the lists: a policy's trace does not depend on the other policies configured, and draw 0 does
        not depend on ``random_draws``)."""
        key = (self.seed, sample_key(sample_id), sample_key(lane.policy))
        return np.random.default_rng(np.random.SeedSequence(key + ((lane.draw,) if lane.draw else ())))

    def score(self, run: "ImageRun") -> None:
        """``score_batch`` of one image."""
        self.score_batch([run])

    def score_batch(self, runs: list["ImageRun"]) -> None:
        """Decode every policy's clicks so far (one decoder call per image), run the strategies on all
        the images at once, and append each policy's trace row; keeps the outputs and the masks for
        ``choose``."""
        later = any(run.rows[run.lanes[0]] for run in runs)  # the runs of a batch share their round
        policy, strategies = ((self.later_policy, self.later_strategies) if later
                              else (self.cfg.sam.multimask_policy, self.strategies))
        states = [self.decode(run.sample, run.features, self.record(run), run.low_res_logits, policy)
                  for run in runs]
        for run, state, outputs in zip(runs, states, self._run_strategies(states, strategies)):
            run.outputs = outputs
            if self.mask_prompt == "previous":
                run.low_res_logits = torch.from_numpy(state.cache_entry.logits).float().unsqueeze(1)
            self._append_rows(run, state)

    def _append_rows(self, run: "ImageRun", state: EvalSample) -> None:
        """Each policy's trace row for the round just scored (``run.outputs``), and its mask."""
        sample = run.sample
        height, width = sample.original_hw
        mask_output = run.outputs[self.mask_method]
        prob = upsample(mask_output.mean_prob, (height, width), torch.device("cpu")).clamp_(0.0, 1.0)
        quality = mask_scores(prob, upsample(mask_output.primary, (height, width), torch.device("cpu")),
                              self.cfg.evaluation.mask_quality_band)
        run.predicted = (prob > PROB_THRESHOLD).numpy()
        predicted_iou = state.cache_entry.selected_iou_predictions
        clicks = len(run.rows[run.lanes[0]]) + 1
        for index, lane in enumerate(run.lanes):
            x, y, label = run.placed[lane]
            run.rows[lane].append({
                "safe_id": sample.safe_id, "group": sample.group, "unseen": run.unseen, "policy": lane.policy,
                "draw": lane.draw, "clicks": clicks, "iou": mask_iou(run.predicted[index], run.annotator.truth),
                "quality": float(quality[index]["band_uncertainty"]), "predicted_iou": float(predicted_iou[index]),
                "x": x, "y": y, "label": label})

    def record(self, run: "ImageRun") -> dict:
        """The prompt-set record of the lanes' interactions so far: prompt set ``p`` = lane ``p``."""
        sample = run.sample
        height, width = sample.original_hw
        return clicked_record(
            sample.sample_id, sample.safe_id, (height, width),
            [clicked_promptset([(col, row) for row, col in run.histories[lane].clicks], run.histories[lane].labels,
                               run.box, height, width, promptset_id=index) for index, lane in enumerate(run.lanes)],
            float(sample.record["gaussian_sigma"]), int(sample.record["point_width"]), split=sample.record["split"])

    def choose(self, run: "ImageRun") -> None:
        """Every lane's next click from the last ``score``: chosen, answered, added."""
        size = run.sample.original_hw
        spacing = click_spacing(self.min_distance, float(run.sample.record["gaussian_sigma"]), size)
        for index, lane in enumerate(run.lanes):
            run.placed[lane] = self._next_click(lane, index, run.histories[lane], run.outputs, run.predicted[index],
                                                run.annotator, run.rngs[lane], size, spacing)

    def decode(self, sample: EvalSample, features: dict[str, torch.Tensor], record: dict,
               mask_input: torch.Tensor | None = None, multimask_policy: str | None = None) -> EvalSample:
        """One decoder call for every lane's prompt set -> the ``EvalSample`` of those prompt sets.
        ``mask_input``: ``L x 1 x 256 x 256`` FRAME256 logits given to SAM as mask prompts, or None;
        ``multimask_policy``: the output kept (default ``sam.multimask_policy``)."""
        prompts, ids = record_prompts(record)
        entry = sample.cache_entry
        mask_input = None if mask_input is None else mask_input.to(self.backbone.device)
        decoded = decoded_entry(self.backbone, features, entry.original_hw, entry.input_hw, prompts, ids,
                                START_PROMPT_MODES[self.start_with],
                                multimask_policy or self.cfg.sam.multimask_policy, sample.safe_id,
                                entry.split, mask_input=mask_input)
        return EvalSample.build(sample.safe_id, sample.group, decoded, record, self.cfg.training.logit_clip,
                                sample.image_loader)

    def _run_strategies(self, samples: list[EvalSample], strategies: dict[str, Strategy]
                        ) -> list[dict[str, StrategyOutput]]:
        """Per image, each of ``strategies`` on the prompt sets that read it (``Strategy.predict_batch``
        over the images); outputs ``P x 256 x 256`` on CPU, rows of the prompt sets a strategy skipped
        left NaN (never read)."""
        outputs: list[dict[str, StrategyOutput]] = [{} for _ in samples]
        with torch.inference_mode():
            for name, strategy in strategies.items():
                indices = self.readers[name]
                parts = strategy.predict_batch([subset_sample(sample, indices, self.cfg.training.logit_clip)
                                                for sample in samples])
                for sample, part, image_outputs in zip(samples, parts, outputs):
                    image_outputs[name] = self._full_rows(part, indices, sample.num_promptsets)
        return outputs

    @staticmethod
    def _full_rows(part: StrategyOutput, indices: list[int], num_promptsets: int) -> StrategyOutput:
        """``part`` (the rows ``indices``) on CPU as ``num_promptsets`` rows, the others NaN."""
        if len(indices) == num_promptsets:
            return StrategyOutput(part.mean_prob.float().cpu(),
                                  {key: value.float().cpu() for key, value in part.maps.items()}, part.primary_map)
        shape = (num_promptsets, *part.mean_prob.shape[1:])
        full = {key: torch.full(shape, float("nan")) for key in ("mean_prob", *part.maps)}
        for key in full:
            full[key][indices] = (part.mean_prob if key == "mean_prob" else part.maps[key]).float().cpu()
        mean_prob = full.pop("mean_prob")
        return StrategyOutput(mean_prob, full, part.primary_map)

    def _next_click(self, lane: Lane, index: int, history: ClickHistory, outputs: dict[str, StrategyOutput],
                    predicted: np.ndarray, annotator: Annotator, rng: np.random.Generator,
                    size: tuple[int, int], spacing: float) -> tuple[int, int, int]:
        """Choose (``spacing``: the image's ``min_distance`` in pixels; the error oracle is the reference
        protocol's simulated user and clicks where it says, spacing aside), ask the annotator, add to
        ``history``; returns ``(x, y, label)`` or -1s when the lane has no pixel left (its history then
        stays as it is)."""
        policy = self.policies[lane.policy]
        choice: ClickChoice | None = None
        if not history.stopped:
            if policy.kind == "oracle":
                choice = choose_by_error_oracle(predicted, annotator.truth, history.clicks)
            elif policy.kind == "random":
                choice = choose_at_random(size, history.clicks, rng, spacing)
            else:
                score_map = upsample(policy.map_of(outputs[policy.strategy])[index:index + 1], size,
                                     torch.device("cpu"))[0].numpy()
                choice = choose_by_map(score_map, history.clicks, spacing)
        if choice is None:
            history.stopped = True
            return (-1, -1, -1)
        label = choice.label if policy.kind == "oracle" else annotator.label(lane, choice)
        history.add(choice, label)
        return (choice.col, choice.row, int(label))


def trace_runner(cfg: PipelineConfig, artifacts: Artifacts, unseen_groups: frozenset[str]
                 ) -> Callable[[list[LabelledSample]], list[pd.DataFrame]]:
    """``batch of labelled samples -> their traces`` with one ``ClickSimulator`` built on first use."""
    simulator: ClickSimulator | None = None

    def run(batch: list[LabelledSample]) -> list[pd.DataFrame]:
        nonlocal simulator
        if simulator is None:
            simulator = ClickSimulator(cfg, artifacts)
        return simulator.simulate_batch(batch, [labelled.inputs.group in unseen_groups for labelled in batch])

    return run
