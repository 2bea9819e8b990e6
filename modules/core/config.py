"""The one configuration every stage reads: typed, validated sections loaded from YAML.

Each section is a dataclass; the loader walks the YAML against the dataclass fields, so an unknown
key, a value of the wrong type or an unknown choice is a one-line ``ConfigError`` naming the
dotted key (``training.lr: expected a number, got 'fast'``). Relative paths resolve against the
folder of the config file. Dotted overrides (``training.lr=1e-3``) are applied before validation,
with their values parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from modules.core.errors import PipelineError, printable
from modules.core.paths import check_component


class ConfigError(PipelineError):
    pass


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    images_root: Path = Path("data/images")
    masks_root: Optional[Path] = Path("data/masks")
    project_root: Path = Path("runs/project")
    layout: Literal["split_roots", "per_group"] = "split_roots"
    split_seed: int = 123
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    mask_threshold: int = 127
    min_image_side: int = 32
    # Groups left out of every training and validation split (head, variance network, Laplace,
    # fusion) and evaluated as unseen domains (``modules/data/domains.py``).
    unseen_groups: list[str] = field(default_factory=list)


@dataclass
class DemoConfig:
    """The procedurally generated demo data set, written to data.images_root / data.masks_root."""

    enabled: bool = False
    seed: int = 2026
    scenes_per_group: int = 40


@dataclass
class PromptGenerationConfig:
    num_promptsets_train: int = 10
    num_promptsets_val: int = 4
    num_promptsets_test: int = 4
    min_pairs: int = 1
    max_pairs: int = 10
    prompt_seed: int = 777
    gaussian_sigma: float = 8.0
    box_jitter: float = 0.0  # uniform jitter of each box side, as a fraction of that side's length


@dataclass
class SamConfig:
    family: Literal["sam", "sam2", "sam3"] = "sam"
    model_type: str = "demo_tiny"
    checkpoint: Path = Path("assets/demo_backbone/demo_tiny.pt")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    prompt_mode: Literal["points", "box", "points_and_box"] = "points"
    multimask_policy: Literal["single", "best_iou"] = "best_iou"
    encoder_batch_size: int = 4
    num_workers: int = 2
    # How the frozen image encoder runs (modules/sam/fast_encoder.py); auto: fast on CUDA, else reference.
    encoder_impl: Literal["auto", "reference", "fast"] = "auto"
    # torch.compile of the encode step at static batch encoder_batch_size; auto: with the fast impl on CUDA.
    compile_encoder: Union[Literal["auto"], bool] = "auto"
    # int8 weight-only linear layers in the image encoder (fast_encoder.Int8WeightOnlyLinear); changes the
    # cached features, so stage 3 records it.
    encoder_int8: bool = False
    # Who writes the cache file while the next batch encodes (modules/cache/cache_writers.py): a
    # child process, or a thread of the stage (h5py keeps the GIL while it writes, so it takes turns).
    cache_writer: Literal["process", "thread"] = "process"
    # Prompt sets per mask-decoder call (0 = all of an image's at once); auto: a few on the CPU, whose
    # caches a large call outgrows, all at once on a GPU (modules/sam/base.py, resolve_decoder_batch).
    decoder_batch: Union[Literal["auto"], int] = "auto"


@dataclass
class HeadConfig:
    channels_in: int = 3
    hidden_channels: int = 16
    use_image_embedding: bool = False
    # SAM's logit also feeds the last layer (weight 1, the rest 0 at initialisation): an untrained head
    # is raw SAM, and training learns a correction to it (README, head: both designs measured).
    residual: bool = True
    # After training: keep the head only if it beats raw SAM on validation (training.guard.GUARD_RULES:
    # overall, every_group, off); else best.pt becomes raw SAM (residual heads only).
    guard: Literal["overall", "every_group", "off"] = "every_group"
    # Fractions of the learned correction the guard tries (sam_logit + w * correction; 0 is raw SAM):
    # it keeps the passing w with the best validation IoU (README: "The blended head").
    guard_blends: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    # every_group: the validation IoU a group may lose against raw SAM and still count as not worse.
    guard_group_tolerance: float = 0.005


@dataclass
class TrainingConfig:
    batch_size: int = 8
    num_epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dice_lambda: float = 0.5
    # 0: batches are read whole in the main process (benchmarks/README.md: faster than workers,
    # which must copy every batch between processes); raise it for slow network storage.
    num_workers: int = 0
    amp: bool = True
    early_stop_patience: int = 5
    logit_clip: float = 20.0
    in_memory: Union[Literal["auto"], bool] = "auto"  # auto: load a packed split when it fits in RAM
    seed: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"


@dataclass
class VarianceConfig:
    hidden_channels: int = 16
    loss: Literal["mc_logit_noise", "gaussian_residual_nll"] = "gaussian_residual_nll"
    mc_samples: int = 16
    log_var_min: float = -5.0
    log_var_max: float = 5.0


@dataclass
class LaplaceConfig:
    target: Literal["head", "sam_decoder"] = "head"
    # Target ``head``: the head layer the posterior covers; only its final layer is supported
    # (checked by ``laplace.head.check_target_layer``).
    target_layer: str = "final_conv"
    approx: Literal["diagonal"] = "diagonal"  # the Hessian structure; only the diagonal is implemented
    backend: str = "backpack"
    # Head target: what picks the prior precision at each temperature (posterior.PRIOR_SELECTIONS):
    # the Laplace marginal likelihood (marglik) or the validation NLL (val_nll, which trades the prior
    # off against the temperature along a ridge and lands on a grid end; see the README).
    prior_selection: Literal["marglik", "val_nll"] = "marglik"
    prior_precision_grid: list[float] = field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4]
    )
    # Likelihood temperatures tried (the GGN is divided by T; chosen on the validation NLL): a mask's
    # pixels are not independent, and T = 1 counts each as a full observation.
    temperature_grid: list[float] = field(default_factory=lambda: [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7])
    # Decades searched past the ends of both grids (head target; posterior.search_inside_grids). 0: the
    # grids as given; quality.json says whether each chosen value lay strictly inside its grid either way.
    grid_widening: int = 0
    num_samples: int = 32
    seed: int = 0
    nll_eps: float = 1e-6
    # How the uncertainty maps come from the per-pixel logit Gaussian: Monte Carlo over num_samples
    # weight draws, or in closed form (probit + Houlsby et al.'s BALD approximation).
    predictive: Literal["mc", "closed_form"] = "closed_form"


@dataclass
class FusionConfig:
    """The uncertainty-guided dense embedding fusion module (``train_head.py --model fusion``)."""

    uncertainty_source: Literal["laplace_epistemic", "map_entropy", "raw_sam_entropy", "variance_network",
                                "constant"] = "laplace_epistemic"
    hidden_channels: int = 16
    # Which decoder output the refinement pass keeps. SAM's own advice with a mask prompt is its
    # single-mask output (the prompt removes the ambiguity the multimask outputs are for); it is
    # also the output the oracle mask helps most (demo: 0.75 vs 0.69 IoU).
    multimask_policy: Literal["single", "best_iou"] = "single"
    # At evaluation, a prompt set keeps SAM's first pass unless the refined mask's predicted IoU (the
    # decoder's own estimate, no ground truth) beats SAM's for its first pass. validated: by more than
    # the margin the fusion run chose on the validation split, or never where the refinement did not
    # beat raw SAM there (its refinement_switch.json); predicted_iou: margin 0; none: always refined.
    gate: Literal["validated", "predicted_iou", "none"] = "validated"
    focal_weight: float = 20.0
    num_epochs: int = 8
    # Low on purpose: the fuse conv starts as the identity on 256 channels, and Adam at 1e-3 moves
    # every weight at once (demo: validation IoU 0.45 -> 0.41 after one epoch; 1e-4 keeps 0.45).
    lr: float = 1e-4
    # Each row costs a decoder pass: train (and validate) on a seeded subset of at most this many
    # rows (0 = every row).
    max_train_rows: int = 0


@dataclass
class TtaMagnitudes:
    brightness: float = 0.1
    contrast: float = 0.05
    saturation: float = 0.05
    hue: float = 0.5


@dataclass
class TtaConfig:
    transforms: list[str] = field(default_factory=lambda: ["hflip", "vflip", "rot90", "rescale_0.75",
                                                           "brightness", "contrast", "hue"])
    magnitudes: TtaMagnitudes = field(default_factory=TtaMagnitudes)
    seed: int = 0
    reuse_cached_features: bool = True


@dataclass
class PromptPerturbationConfig:
    num_samples: int = 10
    point_noise_px: float = 20.0
    box_noise_fraction: float = 0.1
    box_noise_max_px: float = 20.0
    reference_side: float = 1024.0
    seed: int = 0
    # The label of a jittered point: the user's own (original) or the first pass's mask at the new
    # spot (own_mask); never the ground truth, whose re-read is the prompt_perturbation_oracle strategy.
    label_source: Literal["original", "own_mask"] = "original"


@dataclass
class ActivePromptingConfig:
    """The simulated interactive segmentation of stage 7 (``modules/interactive/simulation.py``)."""

    enabled: bool = False
    # Names of ``interactive.simulation.CLICK_POLICIES``, in report order.
    policies: list[str] = field(default_factory=lambda: ["oracle", "bald", "entropy", "variance_network",
                                                         "sam_entropy", "prompt_perturbation", "random"])
    max_clicks: int = 20
    # Pixels (ORIGINAL frame) closer than this to an earlier click of the same policy are never clicked
    # (every policy but the oracle, the reference protocol's user); ``auto``: two prompt-map sigmas
    # (interactive.click_policies.click_spacing), per image.
    min_distance: Union[Literal["auto"], float] = "auto"
    start: Literal["point", "box"] = "point"  # the first interaction: the oracle's first click, or the box
    # What SAM's decoder gets besides the clicks from the second round on: ``previous``, its own
    # low-res logits of the round before as a mask prompt (SAM's interactive protocol); ``none``:
    # the clicks alone (README, "Simulated clicks": on the demo backbone ``previous`` scores lower).
    mask_prompt: Literal["previous", "none"] = "none"
    # The decoder output kept from the second interaction on, when every prompt set holds more than one
    # prompt: ``single``, SAM's single-mask output (SAM returns, and was trained on, only that output
    # for more than one prompt; SAM 2 uses its multimask outputs for one point only);
    # ``as_first``: ``sam.multimask_policy``, as on the first interaction and in stage 3; ``auto``:
    # ``single`` for every backbone but those whose multimask outputs were also trained on several
    # prompts (``sam.registry.MULTIMASK_TRAINED_ON_SEVERAL_PROMPTS``: the demo model).
    later_output: Literal["auto", "single", "as_first"] = "auto"
    # The strategy whose mask is corrected and scored (its probability > 0.5), the same for every policy.
    mask_method: str = "map_head"
    seed: int = 0
    # Independent runs of each random policy per image (seeded by the image, the policy and the
    # draw); its per-image figures are their mean, so one lucky or unlucky draw does not decide a
    # comparison with it. 1 = one run, as every other policy.
    random_draws: int = 4
    max_samples: int = 0  # images simulated (round-robin over the groups); 0 = every evaluated sample
    # Images simulated together, one click round for all of them at a time (the strategies run once
    # over their rows); the traces are those of one image at a time, bit for bit. 1 = image by image.
    batch_images: int = 4


@dataclass
class EvaluationConfig:
    split: Literal["train", "val", "test"] = "test"
    strategies: list[str] = field(default_factory=lambda: ["raw_sam", "map_head", "tta", "prompt_perturbation",
                                                           "laplace", "variance_network"])
    tta: TtaConfig = field(default_factory=TtaConfig)
    prompt_perturbation: PromptPerturbationConfig = field(default_factory=PromptPerturbationConfig)
    variance_mc_samples: int = 0
    refinement: bool = True
    ece_bins: int = 15
    qualitative_per_domain: int = 2
    max_samples: int = 0  # 0 = every sample of the split
    bootstrap_samples: int = 1000  # replicates of the bootstrap over images behind every interval
    bootstrap_seed: int = 0
    # Half-width of the band around the predicted mask's boundary whose mean uncertainty rates a
    # mask (``modules/scoring/mask_quality.py``), as a fraction of the image diagonal.
    mask_quality_band: float = 0.02
    active_prompting: ActivePromptingConfig = field(default_factory=ActivePromptingConfig)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "sam-uncertainty"
    entity: Optional[str] = None
    group: Optional[str] = None
    mode: Literal["offline", "online", "disabled"] = "offline"
    init_timeout_s: float = 30.0


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    prompt_generation: PromptGenerationConfig = field(default_factory=PromptGenerationConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    laplace: LaplaceConfig = field(default_factory=LaplaceConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    config_path: Optional[Path] = field(default=None, metadata={"internal": True})

    def section(self, name: str) -> Any:
        """A section, or a dotted key inside one (``data.mask_threshold``), as YAML-safe values."""
        node: Any = self
        for part in name.split("."):
            node = getattr(node, part)
        return to_plain(node)

    def to_dict(self) -> dict:
        return {f.name: to_plain(getattr(self, f.name)) for f in public_fields(self)}

    @property
    def project_root(self) -> Path:
        return self.data.project_root


# --------------------------------------------------------------------------- validation


def public_fields(obj) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(obj) if not f.metadata.get("internal")]


def to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in public_fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, base_dir: Path) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, base_dir)
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 1)[-1])
        raise ConfigError(f"{key}: {' or '.join(errors)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", base_dir) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build_section(tp, value, key, base_dir)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else (base_dir / path).resolve()
        if printable(str(path)) != str(path):  # a non-UTF-8 folder name, from --set or the config's folder
            raise ConfigError(f"{key}: the path {printable(str(path))} is not valid UTF-8 (the manifests and "
                              "reports that record it are UTF-8); rename the folder")
        return path
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build_section(cls, raw: Any, key: str, base_dir: Path):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in public_fields(cls)}
    for name in raw:
        if name not in known:
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(known)})")
    values = {}
    for name, fld in known.items():
        dotted = f"{key}.{name}" if key else name
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], dotted, base_dir)
        else:
            default = (
                fld.default_factory() if fld.default_factory is not dataclasses.MISSING else fld.default
            )
            if dataclasses.is_dataclass(default):
                default = {}
            # Relative default paths resolve against the config folder like written ones.
            values[name] = _coerce(default, hints[name], dotted, base_dir) if default is not None else None
    return cls(**values)


#: The range of every numeric config key (lists: of each item). Checked by ``load_config`` before
#: any stage runs (so a bad value never reaches a stage's fingerprint); every float must also be
#: finite. ``tests/test_config.py`` checks that every int / float key of the dataclasses is here.
#: Kinds: ``count`` (int >= 1), ``nonneg`` (>= 0), ``positive`` (> 0), ``finite`` (any finite
#: number), ``fraction`` ([0, 1]), ``byte`` (int in [0, 255]).
NUMERIC_RANGES: dict[str, str] = {
    "data.split_seed": "nonneg",
    "data.split_fractions": "fraction",
    "data.mask_threshold": "byte",
    "data.min_image_side": "count",
    "demo.seed": "nonneg",
    "demo.scenes_per_group": "count",
    "prompt_generation.num_promptsets_train": "count",
    "prompt_generation.num_promptsets_val": "count",
    "prompt_generation.num_promptsets_test": "count",
    "prompt_generation.min_pairs": "count",
    "prompt_generation.max_pairs": "count",
    "prompt_generation.prompt_seed": "nonneg",
    "prompt_generation.gaussian_sigma": "positive",
    "prompt_generation.box_jitter": "fraction",
    "sam.encoder_batch_size": "count",
    "sam.num_workers": "nonneg",
    "head.channels_in": "count",
    "head.hidden_channels": "count",
    "head.guard_blends": "fraction",
    "head.guard_group_tolerance": "nonneg",
    "training.batch_size": "count",
    "training.num_epochs": "count",
    "training.lr": "positive",
    "training.weight_decay": "nonneg",
    "training.dice_lambda": "nonneg",
    "training.num_workers": "nonneg",
    "training.early_stop_patience": "nonneg",
    "training.logit_clip": "positive",
    "training.seed": "nonneg",
    "variance.hidden_channels": "count",
    "variance.mc_samples": "count",
    "variance.log_var_min": "finite",
    "variance.log_var_max": "finite",
    "laplace.prior_precision_grid": "positive",
    "laplace.temperature_grid": "positive",
    "laplace.grid_widening": "nonneg",
    "laplace.num_samples": "count",
    "laplace.seed": "nonneg",
    "laplace.nll_eps": "positive",
    "fusion.hidden_channels": "count",
    "fusion.focal_weight": "nonneg",
    "fusion.num_epochs": "count",
    "fusion.lr": "positive",
    "fusion.max_train_rows": "nonneg",
    "evaluation.tta.magnitudes.brightness": "nonneg",
    "evaluation.tta.magnitudes.contrast": "nonneg",
    "evaluation.tta.magnitudes.saturation": "nonneg",
    "evaluation.tta.magnitudes.hue": "nonneg",
    "evaluation.tta.seed": "nonneg",
    "evaluation.prompt_perturbation.num_samples": "count",
    "evaluation.prompt_perturbation.point_noise_px": "nonneg",
    "evaluation.prompt_perturbation.box_noise_fraction": "nonneg",
    "evaluation.prompt_perturbation.box_noise_max_px": "nonneg",
    "evaluation.prompt_perturbation.reference_side": "positive",
    "evaluation.prompt_perturbation.seed": "nonneg",
    "evaluation.variance_mc_samples": "nonneg",
    "evaluation.ece_bins": "count",
    "evaluation.qualitative_per_domain": "nonneg",
    "evaluation.max_samples": "nonneg",
    "evaluation.bootstrap_samples": "count",
    "evaluation.bootstrap_seed": "nonneg",
    "evaluation.mask_quality_band": "positive",
    "evaluation.active_prompting.max_clicks": "count",
    "evaluation.active_prompting.seed": "nonneg",
    "evaluation.active_prompting.max_samples": "nonneg",
    "evaluation.active_prompting.batch_images": "count",
    "evaluation.active_prompting.random_draws": "count",
    "wandb.init_timeout_s": "positive",
}

_RANGE_CHECKS: dict[str, tuple[Any, str]] = {
    "count": (lambda v: v >= 1, "must be an integer of at least 1"),
    "nonneg": (lambda v: v >= 0, "must be non-negative"),
    "positive": (lambda v: v > 0, "must be positive"),
    "finite": (lambda v: True, "must be finite"),
    "fraction": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    "byte": (lambda v: 0 <= v <= 255, "must lie in [0, 255]"),
}


def numeric_keys(cls: Any = None, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> type of every int / float / list-of-numbers field of the config dataclasses."""
    cls = PipelineConfig if cls is None else cls
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for fld in public_fields(cls):
        tp, dotted = hints[fld.name], f"{prefix}{fld.name}"
        if dataclasses.is_dataclass(tp):
            keys.update(numeric_keys(tp, f"{dotted}."))
        elif tp in (int, float) or (typing.get_origin(tp) is list and typing.get_args(tp)[0] in (int, float)):
            keys[dotted] = tp
    return keys


def _check_ranges(cfg: PipelineConfig) -> None:
    """Every numeric key in its range (``NUMERIC_RANGES``) and finite: one line naming key and value."""
    for dotted in numeric_keys():
        node: Any = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        items = [(f"{dotted}[{i}]", v) for i, v in enumerate(node)] if isinstance(node, list) else [(dotted, node)]
        check, requirement = _RANGE_CHECKS[NUMERIC_RANGES.get(dotted, "finite")]
        for key, value in items:
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            if not check(value):
                raise ConfigError(f"{key}: {requirement}, got {value!r}")


def _check_semantics(cfg: PipelineConfig) -> None:
    """Rules across keys, after each numeric key passed its own range (``_check_ranges``)."""
    _check_ranges(cfg)
    fractions = cfg.data.split_fractions
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"data.split_fractions: need three non-negative fractions summing to 1, got {fractions}")
    project_root = cfg.data.project_root.resolve()
    if project_root == Path(project_root.anchor):
        raise ConfigError(f"data.project_root: {project_root} is the filesystem root, where every stage would "
                          "write its folders; give the project a folder of its own (an unset variable in "
                          "data.project_root=$VAR/ gives the root)")
    if cfg.data.layout == "split_roots" and cfg.data.masks_root is None:
        raise ConfigError("data.masks_root: required when data.layout is 'split_roots'")
    if cfg.data.layout == "split_roots" and cfg.data.masks_root.resolve() == cfg.data.images_root.resolve():
        raise ConfigError(f"data.masks_root: the same folder as data.images_root ({cfg.data.images_root}); every "
                          "image would be its own mask (layout 'split_roots' needs two folders)")
    pg = cfg.prompt_generation
    if pg.min_pairs > pg.max_pairs:
        raise ConfigError(f"prompt_generation.min_pairs: need 1 <= min_pairs <= max_pairs, got {pg.min_pairs} and {pg.max_pairs}")
    if cfg.variance.log_var_min >= cfg.variance.log_var_max:
        raise ConfigError(f"variance.log_var_min: must be below variance.log_var_max, got "
                          f"{cfg.variance.log_var_min} and {cfg.variance.log_var_max}")
    if not 0 <= pg.box_jitter < 1:
        raise ConfigError("prompt_generation.box_jitter: must lie in [0, 1)")
    if not cfg.head.guard_blends:
        raise ConfigError("head.guard_blends: need a non-empty list of weights in [0, 1] (1 is the trained head)")
    for key in ("prior_precision_grid", "temperature_grid"):
        if not getattr(cfg.laplace, key):
            raise ConfigError(f"laplace.{key}: need a non-empty list of positive values")
    spacing = cfg.evaluation.active_prompting.min_distance
    if spacing != "auto" and not (math.isfinite(spacing) and spacing >= 0):
        raise ConfigError(f"evaluation.active_prompting.min_distance: must be 'auto' or a non-negative number, "
                          f"got {spacing!r}")
    check_component(cfg.sam.model_type, "sam.model_type")  # part of the SAM cache folder name
    unseen = cfg.data.unseen_groups
    if len(set(unseen)) != len(unseen) or not all(unseen):
        raise ConfigError(f"data.unseen_groups: need distinct, non-empty group names, got {unseen}")


# --------------------------------------------------------------------------- held-out groups


def unseen_group_keys(cfg: PipelineConfig) -> list[str]:
    """``["data.unseen_groups"]`` when groups are held out, else ``[]``: the key joins the fingerprint of
    every stage that selects or fits on training data only when set, so projects made before the key
    existed stay valid while adding, changing or removing held-out groups is a changed input."""
    return ["data.unseen_groups"] if cfg.data.unseen_groups else []


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.lr=1e-3"`` -> (["training", "lr"], 0.001). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. training.lr=1e-3")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {'.'.join(parts[:depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a config. ``path=None`` gives the defaults (relative to CWD)."""
    raw: dict = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        shown = printable(str(path))
        if not path.is_file():
            raise ConfigError(f"--config: no such file {shown}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{shown}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{shown}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
        except OSError as exc:
            raise ConfigError(f"{shown}: cannot read the config ({exc.strerror or exc})") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{shown}: the top level must be a mapping of sections (data:, training:, ...), "
                              f"got {type(raw).__name__}")
        base_dir = path.resolve().parent
    raw = apply_overrides(raw, overrides or [])
    cfg = _build_section(PipelineConfig, raw, "", base_dir)
    cfg.config_path = Path(path).resolve() if path is not None else None
    _check_semantics(cfg)
    return cfg


def require_existing(cfg: PipelineConfig, dotted_key: str, kind: str = "dir") -> Path:
    """Return the path at ``dotted_key``; a one-line ConfigError if it does not exist."""
    node: Any = cfg
    for part in dotted_key.split("."):
        node = getattr(node, part)
    path = Path(node) if node is not None else None
    ok = path is not None and (path.is_dir() if kind == "dir" else path.is_file())
    if not ok:
        raise ConfigError(f"{dotted_key}: {kind == 'dir' and 'folder' or 'file'} does not exist: {path}")
    return path
