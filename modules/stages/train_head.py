"""Stage 5: train the prompt-aware head (MAP), the variance network, or the fusion module.

Each trainable model is a ``TrainingTask`` built by a function in ``TASKS``: the model, its
``step_fn(model, batch) -> (loss, outputs)``, the validation metrics, how the best epoch is
chosen, and the datasets. ``training.trainer.Trainer`` does the rest (resume, DDP, checkpoints).

Runs live in ``<project_root>/checkpoints/<model>/run_<id>/`` (``last.pt``, ``best.pt``, optimizer,
scaler and scheduler states, ``epoch_state.json``, ``config.resolved.yaml``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from modules.cache.packed_reader import PackedBatches, as_float32, collate_batch, packed_dataset
from modules.cache.packing import packed_splits_fingerprint
from modules.cache.sam_cache import SAM_OUTPUT_KEYS
from modules.cache.training_index import open_cache
from modules.core.config import PipelineConfig, unseen_group_keys
from modules.core.device import resolve_device
from modules.core.errors import PipelineError
from modules.core.fileio import remove_tree
from modules.core.stage import KillSwitch, env_int
from modules.evaluation.methods import SOURCE_NEEDS
from modules.evaluation.runs import RunIds, artifact_md5s
from modules.laplace.head import load_head_posterior
from modules.sam.registry import load_configured_backbone
from modules.training.checkpoints import (build_fusion, build_head, build_variance_network, load_trained_head,
                                          load_trained_variance_network)
from modules.training.guard import apply_guard
from modules.training.losses import BceDiceLoss, FocalDiceIouLoss, build_variance_loss, hard_iou
from modules.training.models import VarianceNetwork
from modules.training.run_state import BEST_FILE, load_checkpoint_file
from modules.training.trainer import Trainer, TrainerConfig, batch_iou_metrics, move_to_device, sanity_check
from modules.uncertainty.fusion import (FusionDataset, collate_images, make_uncertainty_source, refinement_step,
                                        score_validation, validate_refinement_switch)
from modules.uncertainty.strategies import read_variance, variance_readout

SANITY_LOSS_FRACTION = 0.6  # --sanity_check passes when one batch's loss falls below this fraction


# --------------------------------------------------------------------------- tasks


@dataclass
class TrainingTask:
    """One trainable model with everything the ``Trainer`` needs to train it (see the module docstring)."""

    model: nn.Module
    step_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, Any]]
    metric_fn: Callable[[Any], dict]
    train_dataset: Any
    val_dataset: Any
    selection_metric: str = "val_iou"
    selection_mode: str = "max"
    collate_fn: Callable | None = None
    num_epochs: int | None = None  # task-specific overrides of the training section
    batch_size: int | None = None
    lr: float | None = None
    validate_initial: bool = False  # see TrainerConfig
    # Run after training (also on a resumed finished run) with the run folder; returns summary items.
    after_fit: Callable[[Path], dict] | None = None


def packed_datasets(cfg: PipelineConfig):
    """The packed train and val splits (stage 4.5) as datasets."""
    return [packed_dataset(cfg, split) for split in ("train", "val")]


def packed_batch_datasets(cfg: PipelineConfig):
    """The packed train and val splits as batch-at-once datasets (``collate_fn=collate_batch``;
    batches arrive in the stored float16 / uint8 and the step converts them on its device)."""
    return [PackedBatches(packed) for packed in packed_datasets(cfg)]


def conv_layout(inputs: torch.Tensor) -> torch.Tensor:
    """``B x C x H x W`` inputs in channels-last memory order (same values and shape): the head's and
    the variance network's few-channel convolutions run faster on it, forward and backward
    (benchmarks/README.md, training)."""
    return inputs.contiguous(memory_format=torch.channels_last)


def head_task(cfg: PipelineConfig, device: torch.device, head_run_id: str | None) -> TrainingTask:
    model = build_head(cfg)
    loss_fn = BceDiceLoss(dice_lambda=cfg.training.dice_lambda)

    def step_fn(model, batch):
        batch = as_float32(batch)
        logits = model(conv_layout(batch["inputs"]), batch.get("image_embedding"))
        return loss_fn(logits.float(), batch["target"]), (logits.detach().float(), batch["target"])

    train, val = packed_batch_datasets(cfg)

    def guard(folder: Path) -> dict:
        """The validation guard (``head.guard``) on the best checkpoint; rank 0 only under DDP."""
        if not (folder / BEST_FILE).is_file() or env_int(os.environ, "RANK", default=0) != 0:
            return {}
        report = apply_guard(folder, build_head(cfg), val.packed, cfg.head.guard, device, cfg.training.batch_size,
                             cfg.head.guard_blends, cfg.head.guard_group_tolerance)
        return {"guard_kept": report["kept"], "guard_blend": report["blend"],
                "guard_val_iou_head": report["overall"]["head_iou"],
                "guard_val_iou_kept": report["kept_overall"]["head_iou"],
                "guard_val_iou_raw_sam": report["overall"]["raw_sam_iou"]}

    return TrainingTask(model, step_fn, batch_iou_metrics, train, val, collate_fn=collate_batch, after_fit=guard)


def variance_margin(log_var: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """Per sample: mean log-variance (or any uncertainty map) on pixels the MAP head gets wrong minus
    on those it gets right (0 where a sample has no pixel of one kind). ``log_var``, ``wrong``:
    ``B x 1 x H x W``. ``primary_margin`` is that of the map the evaluation ranks
    (``uncertainty.strategies.VARIANCE_READOUTS``)."""
    wrong = wrong.float()
    right = 1.0 - wrong
    dims = (1, 2, 3)
    mean_wrong = (log_var * wrong).sum(dims) / wrong.sum(dims).clamp_min(1)
    mean_right = (log_var * right).sum(dims) / right.sum(dims).clamp_min(1)
    both = (wrong.sum(dims) > 0) & (right.sum(dims) > 0)
    return torch.where(both, mean_wrong - mean_right, torch.zeros_like(mean_wrong))


def variance_task(cfg: PipelineConfig, device: torch.device, head_run_id: str | None) -> TrainingTask:
    head, _ = load_trained_head(cfg, head_run_id, device)
    model = build_variance_network(cfg)
    loss_fn = build_variance_loss(cfg.variance.loss, **({"num_samples": cfg.variance.mc_samples}
                                                         if cfg.variance.loss == "mc_logit_noise" else {}))

    def step_fn(model, batch):
        batch = as_float32(batch)
        inputs = conv_layout(batch["inputs"])
        with torch.no_grad():
            map_logits = head.to(inputs.device)(inputs, batch.get("image_embedding")).float()
        log_var = model(VarianceNetwork.build_inputs(inputs, map_logits)).float()
        loss = loss_fn(map_logits, log_var, batch["target"])
        return loss, (map_logits, batch["target"], log_var.detach())

    readout = variance_readout(cfg.variance.loss)

    def metric_fn(outputs):
        map_logits, target, log_var = outputs
        wrong = (map_logits > 0) != (target > 0.5)
        iou = hard_iou(map_logits, target)
        _, maps = read_variance(readout, map_logits, log_var)
        return {"iou": iou, "log_var_margin": variance_margin(log_var, wrong),
                "primary_margin": variance_margin(maps[readout.primary_map], wrong)}

    train, val = packed_batch_datasets(cfg)
    return TrainingTask(model, step_fn, metric_fn, train, val, selection_metric="val_loss", selection_mode="min",
                        collate_fn=collate_batch)


def fusion_uncertainty_source(cfg: PipelineConfig, run_id: str, device):
    """The configured uncertainty map (``fusion.uncertainty_source``) from the trained runs of ``run_id``."""
    name = cfg.fusion.uncertainty_source
    head = posterior = variance_network = None
    if name == "laplace_epistemic":
        head, posterior = load_head_posterior(cfg, run_id, device)
    elif name in ("map_entropy", "variance_network"):
        head, _ = load_trained_head(cfg, run_id, device)
    if name == "variance_network":
        variance_network = load_trained_variance_network(cfg, run_id, device)
    return make_uncertainty_source(name, head=head, posterior=posterior, variance_network=variance_network,
                                   num_samples=cfg.laplace.num_samples, seed=cfg.laplace.seed,
                                   predictive=cfg.laplace.predictive,
                                   log_var_range=(cfg.variance.log_var_min, cfg.variance.log_var_max),
                                   variance_loss=cfg.variance.loss)


def fusion_task(cfg: PipelineConfig, device: torch.device, head_run_id: str | None) -> TrainingTask:
    backbone = load_configured_backbone(cfg.sam, device)
    cache = open_cache(cfg)
    train_packed, val_packed = packed_datasets(cfg)
    train, val = (FusionDataset(packed, cache, cfg.project_root, cfg.fusion.max_train_rows, cfg.training.seed)
                  for packed in (train_packed, val_packed))
    source = fusion_uncertainty_source(cfg, head_run_id, device)
    step_fn = refinement_step(backbone, cfg.sam.prompt_mode, cfg.fusion.multimask_policy, source,
                              FocalDiceIouLoss(focal_weight=cfg.fusion.focal_weight))

    def validate_switch(folder: Path) -> dict:
        """The validated refinement switch on every validation row, from the best checkpoint."""
        def score():
            fusion = build_fusion(cfg)
            fusion.load_state_dict(load_checkpoint_file(folder / BEST_FILE))
            return score_validation(backbone, fusion, FusionDataset(val_packed, cache, cfg.project_root),
                                    cfg.sam.prompt_mode, cfg.fusion.multimask_policy, source)
        record = validate_refinement_switch(folder, folder / BEST_FILE, score,
                                            {"uncertainty_source": cfg.fusion.uncertainty_source})
        return {"refinement_switch_enabled": record["enabled"], "refinement_switch_margin": record["margin"]}

    # One image (all its kept prompt sets, one decoder call) per step.
    return TrainingTask(build_fusion(cfg), step_fn, batch_iou_metrics, train, val, collate_fn=collate_images,
                        num_epochs=cfg.fusion.num_epochs, lr=cfg.fusion.lr, validate_initial=True, batch_size=1,
                        after_fit=validate_switch)


def trained_on_artifacts(cfg: PipelineConfig, model_kind: str) -> set[str]:
    """Names of ``evaluation.runs.ARTIFACT_FILES`` a model is trained on (beyond the packed splits):
    the variance network on the frozen head, the fusion module on SAM and the files its
    ``fusion.uncertainty_source`` reads (head, the head's Laplace state, the variance network)."""
    if model_kind == "variance":
        return {"head"}
    if model_kind == "fusion":
        return {"sam_checkpoint", *SOURCE_NEEDS[cfg.fusion.uncertainty_source]}
    return set()


#: Config keys outside the trained model's sections that shape each ``fusion.uncertainty_source`` map.
SOURCE_SETTINGS: dict[str, list[str]] = {
    "laplace_epistemic": ["laplace.num_samples", "laplace.seed", "laplace.predictive"],
    "variance_network": ["variance.log_var_min", "variance.log_var_max"],
}


def fingerprint_sections(cfg: PipelineConfig, model_kind: str) -> list[str]:
    """Config sections (or dotted keys) a model's training depends on (``data.unseen_groups``, when
    set: the groups its training and validation rows leave out)."""
    held_out = unseen_group_keys(cfg)
    if model_kind == "variance":
        return ["head", "training", "variance", *held_out]
    if model_kind == "fusion":
        return ["head", "training", "fusion", *SAM_OUTPUT_KEYS, *SOURCE_SETTINGS.get(cfg.fusion.uncertainty_source, []),
                *held_out]
    return ["head", "training", *held_out]


def training_upstream(cfg: PipelineConfig, model_kind: str, head_run_id: str) -> dict:
    """The fingerprint's upstream: the packed splits and the md5 of every artifact the model trains on,
    so a retrained head or a refitted Laplace / variance network stops a rerun of what was built on it."""
    upstream: dict = packed_splits_fingerprint(cfg.project_root)
    names = trained_on_artifacts(cfg, model_kind)
    if names:
        upstream["artifact_md5s"] = artifact_md5s(cfg, RunIds.resolve(head_run_id), names)
    return upstream


TASKS: dict[str, Callable[[PipelineConfig, torch.device, str | None], TrainingTask]] = {
    "head": head_task,
    "variance": variance_task,
    "fusion": fusion_task,
}


def kill_hook_from_env():
    """Tests set ``PIPELINE_TEST_KILL_AFTER_UNITS=n`` to SIGKILL training once epoch n is published."""
    kill_switch = KillSwitch.from_env()
    if kill_switch is None:
        return None

    def hook(event: str, epoch: int) -> None:
        if event == "published":
            kill_switch.reach(epoch)

    return hook


def trainer_config(cfg: PipelineConfig, task: TrainingTask) -> TrainerConfig:
    t = cfg.training
    return TrainerConfig(batch_size=task.batch_size or t.batch_size, num_workers=t.num_workers, lr=task.lr or t.lr,
                         weight_decay=t.weight_decay, num_epochs=task.num_epochs or t.num_epochs,
                         early_stop_patience=t.early_stop_patience, amp=t.amp,
                         seed=t.seed, selection_metric=task.selection_metric, selection_mode=task.selection_mode,
                         validate_initial=task.validate_initial)


def run_stage(ctx, model_kind: str, run_id: str, resume: bool, run_sanity_check: bool,
              head_run_id: str | None) -> None:
    """Train (or resume, or sanity-check) one model; see the module docstring."""
    cfg = ctx.cfg
    if model_kind not in TASKS:
        raise PipelineError(f"--model: {model_kind!r} is not one of {', '.join(TASKS)}")
    device = resolve_device(cfg.training.device, key="training.device")
    torch.manual_seed(cfg.training.seed)
    task = TASKS[model_kind](cfg, device, head_run_id or run_id)
    for split, dataset in (("train", task.train_dataset), ("val", task.val_dataset)):
        if len(dataset) == 0:
            raise PipelineError(f"data.split_fractions: the {split!r} split has no packed rows; training needs "
                                f"both a train and a val split (rerun the stages from build_manifests.py)")

    if run_sanity_check:
        loader = torch.utils.data.DataLoader(task.train_dataset, batch_size=min(4, len(task.train_dataset)),
                                             shuffle=False, collate_fn=task.collate_fn)
        batch = move_to_device(next(iter(loader)), device)
        with torch.no_grad():
            initial = float(task.step_fn(task.model.to(device), batch)[0])
        # Relative: the seed head sees a 5 x 5 neighbourhood and cannot memorise any mask, but a
        # broken graph, frozen weights or misaligned targets cannot cut the loss by 40% either.
        threshold = SANITY_LOSS_FRACTION * initial
        reached, loss = sanity_check(task.model, task.step_fn, batch, loss_threshold=threshold, device=device)
        ctx.summary({"sanity_check_reached": reached, "sanity_check_initial_loss": round(initial, 5),
                     "sanity_check_threshold": round(threshold, 5), "sanity_check_final_loss": round(loss, 5)})
        if not reached:
            raise PipelineError(f"sanity check: could not overfit one batch (loss {initial:.4f} -> {loss:.4f}, "
                                f"threshold {threshold:.4f})")
        return

    folder = ctx.output_dir
    if ctx.force and not resume:  # a fresh run replaces the old one
        remove_tree(folder, ctx.project_root)
        folder.mkdir(parents=True)
    ctx.check_inputs(fingerprint_sections(cfg, model_kind), training_upstream(cfg, model_kind, head_run_id or run_id))
    ctx.tracker.watch(task.model)
    trainer = Trainer(task.model, task.step_fn, task.train_dataset, task.val_dataset, trainer_config(cfg, task),
                      folder, ctx.tracker, device=device, metric_fn=task.metric_fn, collate_fn=task.collate_fn,
                      artifact_name=f"{model_kind}-run_{run_id}", checkpoint_hook=kill_hook_from_env())
    result = trainer.fit(resume=resume)
    last = result.history[-1] if result.history else {}
    ctx.summary({"run_dir": str(folder), "epochs_completed": result.epochs_completed,
                 f"best_{task.selection_metric}": result.best_metric, "best_epoch": result.best_epoch,
                 "stopped_early": result.stopped_early,
                 **{k: v for k, v in last.items() if k.startswith("val_")},
                 **(task.after_fit(folder) if task.after_fit else {})})
