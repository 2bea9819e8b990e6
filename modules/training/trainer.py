"""The resumable, seeded, optionally distributed training loop shared by every trainable model.

The loop knows nothing about what it trains: ``step_fn(model, batch) -> (loss, outputs)`` computes a
scalar loss from one batch already on the device, and ``metric_fn(outputs) -> {name: per-sample
values (B,)}`` scores validation batches. What the run folder holds and how an epoch is committed:
``training.run_state``; the process group and the data order: ``training.distributed``. AMP runs on
CUDA only (bf16 autocast by default, fp16 with loss scaling when asked for or without bf16).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from modules.core.fileio import read_json
from modules.core.progress import Progress, track
from modules.training.distributed import (DistributedContext, EpochSeededSampler, ShardedSequentialSampler,
                                          TrainingWorkerInit)
from modules.training.losses import hard_iou
from modules.training.run_state import (ALWAYS_SAVED_FILES, BEST_FILE, MODEL_FILE, OPTIMIZER_FILE, SCALER_FILE,
                                        SCHEDULER_FILE, STATE_FILE, STATE_FORMAT_VERSION, ResumeError, TrainingError,
                                        capture_rng_state, commit_epoch, cpu_state_dict, load_checkpoint_file,
                                        recover_run_dir, restore_rng_state, seed_everything)

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Any]]
MetricFn = Callable[[Any], Mapping[str, torch.Tensor]]
CheckpointHook = Callable[[str, int], None]


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainerConfig:
    """Hyper-parameters of one training run.

    ``early_stop_patience``: epochs without improvement of ``selection_metric`` before stopping
    (``None`` never stops). ``selection_metric`` names a key of the per-epoch record (``val_iou``,
    ``val_loss``, ``val_<metric>``); ``selection_mode`` is ``"max"`` or ``"min"``.
    ``validate_initial``: validate the untrained model first and commit it as epoch 0, so that
    ``best.pt`` is never worse on validation than the starting point (for modules that start as a
    working model, such as the fusion module, which starts as SAM's own mask-prompt pass).
    ``amp_dtype``: ``"bfloat16"`` or ``"float16"`` (CUDA only). ``min_lr``: the cosine schedule's
    floor, reached after ``num_epochs`` epochs.
    """

    batch_size: int = 8
    num_workers: int = 0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    num_epochs: int = 30
    early_stop_patience: int | None = 5
    amp: bool = True
    amp_dtype: str = "bfloat16"
    seed: int = 0
    min_lr: float = 0.0
    grad_clip_norm: float | None = None
    selection_metric: str = "val_iou"
    selection_mode: str = "max"
    validate_initial: bool = False
    show_progress: bool | None = None  # None: a bar on a terminal, else progress lines (core.progress)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_epochs < 1:
            raise TrainingError("training: batch_size and num_epochs must be at least 1")
        if self.selection_mode not in ("max", "min"):
            raise TrainingError(f"training.selection_mode: {self.selection_mode!r} is not 'max' or 'min'")
        if self.amp_dtype not in AMP_DTYPES:
            raise TrainingError(f"training.amp_dtype: {self.amp_dtype!r} is not one of {', '.join(AMP_DTYPES)}")

    def resume_fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        keys = ("batch_size", "lr", "weight_decay", "num_epochs", "seed", "min_lr", "selection_metric", "selection_mode",
                "validate_initial")
        return {key: getattr(self, key) for key in keys}


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainingResult:
    run_dir: Path
    best_metric: float | None
    best_epoch: int | None
    epochs_completed: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_path(self) -> Path:
        return self.run_dir / BEST_FILE


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Recursively move every tensor of a (nested) dict / list / tuple batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def batch_size_of(batch: Any) -> int:
    """Size of dimension 0 of the first tensor found in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        try:
            return batch_size_of(value)
        except TypeError:
            continue
    raise TypeError("batch holds no tensor")


def batch_iou_metrics(outputs: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Default ``metric_fn``: ``(logits B x 1 x H x W, target B x 1 x H x W)`` -> per-sample IoU and Dice.

    The predicted mask is ``logits > 0``; a sample with both masks empty scores 1.
    """
    logits, target = outputs
    iou = hard_iou(logits, target)
    return {"iou": iou, "dice": 2.0 * iou / (1.0 + iou)}


# --------------------------------------------------------------------------- trainer


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class Trainer:
    """Train ``model`` with AdamW and a per-epoch cosine schedule, one committed epoch at a time.

    ``fit(resume=True)`` continues from the last committed epoch with the same weights, optimizer,
    scaler, scheduler and RNG states, so a killed and resumed run ends bit-identical to a straight
    one. Under DDP the model is wrapped in ``DistributedDataParallel``, validation is sharded without
    padding, losses and metrics are all-reduced as sums, and only rank 0 logs and writes files.
    ``train_dataset`` / ``val_dataset``: map-style datasets whose items ``collate_fn`` (default
    collation when ``None``) batches into whatever ``step_fn`` expects. ``tracker``: an object with
    ``log(metrics, step)``, ``log_artifact(path, name, type, aliases)`` and ``watch(model)``.
    ``checkpoint_hook(event, epoch)``: called on rank 0 after each checkpoint stage
    (``"staged:<file>"``, ``"committed"``, ``"published"``); tests use it to simulate crashes.
    """

    def __init__(
        self,
        model: nn.Module,
        step_fn: StepFn,
        train_dataset: Dataset,
        val_dataset: Dataset,
        config: TrainerConfig,
        run_dir: str | os.PathLike,
        tracker: Any,
        device: str | torch.device = "cpu",
        metric_fn: MetricFn = batch_iou_metrics,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        artifact_name: str | None = None,
        checkpoint_hook: CheckpointHook | None = None,
    ) -> None:
        self.model = model
        self.step_fn = step_fn
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.config = config
        self.run_dir = Path(run_dir)
        self.tracker = tracker
        self.device = torch.device(device)
        self.metric_fn = metric_fn
        self.collate_fn = collate_fn
        self.artifact_name = artifact_name or f"{self.run_dir.name}-best"
        self.checkpoint_hook = checkpoint_hook
        self.best_metric_key = f"best_{config.selection_metric}"

    # ----------------------------------------------------------------- setup

    def _setup(self) -> None:
        self.dist = DistributedContext.from_env(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.model.to(self.device)
        cfg = self.config
        self.use_amp = cfg.amp and self.device.type == "cuda"
        amp_dtype = AMP_DTYPES[cfg.amp_dtype]
        if self.use_amp and amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            amp_dtype = torch.float16
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp and amp_dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=cfg.num_epochs, eta_min=cfg.min_lr
        )
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model: nn.Module = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
            self.train_sampler: Sampler[int] = DistributedSampler(
                self.train_dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=cfg.seed
            )
        else:
            self.train_model = self.model
            self.train_sampler = EpochSeededSampler(len(self.train_dataset), cfg.seed)
        self.loader_generator = torch.Generator()
        self.train_loader = self._loader(self.train_dataset, self.train_sampler, self.loader_generator)
        self.val_loader = self._loader(
            self.val_dataset, ShardedSequentialSampler(len(self.val_dataset), self.dist.rank, self.dist.world_size),
            torch.Generator().manual_seed(cfg.seed),
        )
        self.show_progress = cfg.show_progress is not False and self.dist.is_main

    def _loader(self, dataset: Dataset, sampler: Sampler[int], generator: torch.Generator) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=self.config.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=TrainingWorkerInit(),
            generator=generator,
        )

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    # ----------------------------------------------------------------- state

    def _fresh_state(self) -> dict[str, Any]:
        if (self.run_dir / STATE_FILE).exists():
            raise TrainingError(
                f"{self.run_dir / STATE_FILE}: the run folder already holds a run; resume it or use a new run folder"
            )
        seed_everything(self.config.seed + self.dist.rank)
        return {
            "format_version": STATE_FORMAT_VERSION,
            "epoch": 0,
            "best_metric": None,
            "best_epoch": None,
            "patience_counter": 0,
            "stopped_early": False,
            "history": [],
            "data_order_seed": self.config.seed,
            "selection_metric": self.config.selection_metric,
            "config": self.config.resume_fingerprint(),
        }

    def _resumed_state(self) -> dict[str, Any]:
        state_path = self.run_dir / STATE_FILE
        if not state_path.is_file():  # checked on every rank, so no rank waits at the barrier below
            raise ResumeError(f"{state_path}: missing; cannot resume (start without resume)")
        if self.dist.is_main:
            recover_run_dir(self.run_dir)
        self.dist.barrier()
        state = read_json(state_path)
        for key, value in self.config.resume_fingerprint().items():
            saved = state.get("config", {}).get(key)
            if saved != value:
                raise ResumeError(f"{state_path}: the run was started with {key}={saved!r}, now {key}={value!r}")
        required = list(ALWAYS_SAVED_FILES) + ([BEST_FILE] if state["best_epoch"] is not None else [])
        for name in required:
            if not (self.run_dir / name).is_file():
                raise ResumeError(f"{self.run_dir / name}: missing; cannot resume")
        self.model.load_state_dict(load_checkpoint_file(self.run_dir / MODEL_FILE))
        self.optimizer.load_state_dict(load_checkpoint_file(self.run_dir / OPTIMIZER_FILE))
        self.scaler.load_state_dict(load_checkpoint_file(self.run_dir / SCALER_FILE))
        self.scheduler.load_state_dict(load_checkpoint_file(self.run_dir / SCHEDULER_FILE))
        rng_states = state["rng_states"]
        restore_rng_state(rng_states[self.dist.rank % len(rng_states)])
        log.info("resumed %s after epoch %d", self.run_dir, state["epoch"])
        return state

    def _write_checkpoint(self, state: dict[str, Any], improved: bool) -> None:
        """Stage the ``.pt`` files, commit ``epoch_state.json``, publish (rank 0; all ranks call it)."""
        state["rng_states"] = self.dist.all_gather_object(capture_rng_state(self.device))
        self.dist.barrier()
        if self.dist.is_main:
            model_state = cpu_state_dict(self.model)
            files: list[tuple[str, Any]] = [(MODEL_FILE, model_state)]
            if improved:
                files.append((BEST_FILE, model_state))
            files += [
                (OPTIMIZER_FILE, self.optimizer.state_dict()),
                (SCALER_FILE, self.scaler.state_dict()),
                (SCHEDULER_FILE, self.scheduler.state_dict()),
            ]
            commit_epoch(self.run_dir, state, files, self._hook)
        self.dist.barrier()

    def _hook(self, event: str, epoch: int) -> None:
        if self.checkpoint_hook is not None:
            self.checkpoint_hook(event, epoch)

    # ----------------------------------------------------------------- epochs

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.train_sampler.set_epoch(epoch)
        self.loader_generator.manual_seed(self.config.seed + epoch)
        self.train_model.train()
        loss_sum, sample_count, data_wait, compute = 0.0, 0, 0.0, 0.0
        progress = Progress(len(self.train_loader), f"epoch {epoch} train", "batches", enabled=self.show_progress,
                            terminal=True if self.config.show_progress else None)
        step = 0
        fetch_start = time.perf_counter()
        batches = iter(self.train_loader)  # starts the workers: counted as data wait
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            compute_start = time.perf_counter()
            data_wait += compute_start - fetch_start
            batch = move_to_device(batch, self.device)
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss, _ = self.step_fn(self.train_model, batch)
            self.scaler.scale(loss).backward()
            if self.config.grad_clip_norm is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_value = float(loss.detach())  # synchronises, so compute time is not hidden in data wait
            if not math.isfinite(loss_value):
                raise TrainingError(f"{self.run_dir}: epoch {epoch} step {step}: training loss is {loss_value}")
            size = batch_size_of(batch)
            loss_sum += loss_value * size
            sample_count += size
            progress.update(1, loss=f"{loss_value:.4f}")
            step += 1
            fetch_start = time.perf_counter()
            compute += fetch_start - compute_start
        progress.close()
        totals = self.dist.all_reduce_sum(
            torch.tensor([loss_sum, sample_count, data_wait, compute], dtype=torch.float64, device=self.device)
        ).tolist()
        return {
            "train_loss": totals[0] / max(totals[1], 1.0),
            "data_wait_s": totals[2] / self.dist.world_size,
            "compute_s": totals[3] / self.dist.world_size,
            "data_wait_fraction": totals[2] / max(totals[2] + totals[3], 1e-12),
        }

    @torch.no_grad()
    def _validate(self, epoch: int) -> dict[str, float]:
        # The unwrapped model: DDP forward would add collectives that uneven validation shards break.
        self.model.eval()
        loss_sum, sample_count = 0.0, 0
        metric_sums: dict[str, float] = {}
        for batch in track(self.val_loader, f"epoch {epoch} val", unit="batches", enabled=self.show_progress):
            batch = move_to_device(batch, self.device)
            with self._autocast():
                loss, outputs = self.step_fn(self.model, batch)
            size = batch_size_of(batch)
            loss_sum += float(loss) * size
            sample_count += size
            for name, values in self.metric_fn(outputs).items():
                metric_sums[name] = metric_sums.get(name, 0.0) + float(values.float().sum())
        names = sorted(set().union(*self.dist.all_gather_object(sorted(metric_sums))))
        totals = self.dist.all_reduce_sum(
            torch.tensor([loss_sum, sample_count] + [metric_sums.get(n, 0.0) for n in names],
                         dtype=torch.float64, device=self.device)
        ).tolist()
        count = max(totals[1], 1.0)
        record = {"val_loss": totals[0] / count}
        record.update({f"val_{name}": total / count for name, total in zip(names, totals[2:])})
        return record

    # ----------------------------------------------------------------- main loop

    def fit(self, resume: bool = False) -> TrainingResult:
        """Train (or continue a run when ``resume``) until ``num_epochs`` or early stopping."""
        self._setup()
        try:
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            self.dist.barrier()
            state = self._resumed_state() if resume else self._fresh_state()
            ran_epochs = self._run_epochs(state)
            if ran_epochs and self.dist.is_main and state["best_epoch"] is not None:
                self.tracker.log_artifact(
                    self.run_dir / BEST_FILE, name=self.artifact_name, type="model",
                    aliases=["best", f"epoch-{state['best_epoch']}"],
                )
            return TrainingResult(
                run_dir=self.run_dir,
                best_metric=state["best_metric"],
                best_epoch=state["best_epoch"],
                epochs_completed=state["epoch"],
                stopped_early=state["stopped_early"],
                history=state["history"],
            )
        finally:
            self.dist.shutdown()

    def _run_epochs(self, state: dict[str, Any]) -> int:
        cfg = self.config
        if self.dist.is_main:
            self.tracker.watch(self.model)
        ran = 0
        if cfg.validate_initial and not state["history"]:
            self._commit_initial(state)
        for epoch in range(state["epoch"] + 1, cfg.num_epochs + 1):
            if state["stopped_early"]:
                break
            epoch_start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            record: dict[str, Any] = {"epoch": epoch, "lr": lr}
            record.update(self._train_epoch(epoch))
            record.update(self._validate(epoch))
            self.scheduler.step()
            self._check_selection_metric(record)
            improved = _is_better(record[cfg.selection_metric], state["best_metric"], cfg.selection_mode)
            if improved:
                state["best_metric"], state["best_epoch"], state["patience_counter"] = record[cfg.selection_metric], epoch, 0
            else:
                state["patience_counter"] += 1
            record[self.best_metric_key] = state["best_metric"]
            record["patience_counter"] = state["patience_counter"]
            record["epoch_time_s"] = time.perf_counter() - epoch_start
            state["epoch"] = epoch
            state["history"].append(record)
            patience = cfg.early_stop_patience
            state["stopped_early"] = patience is not None and state["patience_counter"] >= patience
            if self.dist.is_main:
                # Logged before the commit: a crash in between re-runs the epoch and logs the same
                # step again (at least once), rather than never logging it.
                self.tracker.log({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            self._write_checkpoint(state, improved)
            ran += 1
            if self.dist.is_main:
                log.info(
                    "epoch %d: train_loss %.4f val_loss %.4f %s %.4f (best %.4f @ %s) data_wait %.0f%%",
                    epoch, record["train_loss"], record["val_loss"], cfg.selection_metric,
                    record[cfg.selection_metric], state["best_metric"] if state["best_metric"] is not None else float("nan"),
                    state["best_epoch"], 100 * record["data_wait_fraction"],
                )
            if state["stopped_early"]:
                log.info("early stop after epoch %d (no improvement for %d epochs)", epoch, state["patience_counter"])
        return ran

    def _check_selection_metric(self, record: dict[str, Any]) -> None:
        metric = self.config.selection_metric
        if metric not in record:
            raise TrainingError(f"training.selection_metric: {metric!r} is not among {', '.join(sorted(record))}")

    def _commit_initial(self, state: dict[str, Any]) -> None:
        """Epoch 0: the untrained model's validation record, committed as the first best."""
        record: dict[str, Any] = {"epoch": 0, "lr": 0.0, **self._validate(0)}
        self._check_selection_metric(record)
        state["best_metric"], state["best_epoch"] = record[self.config.selection_metric], 0
        record[self.best_metric_key] = state["best_metric"]
        record["patience_counter"] = 0
        state["history"].append(record)
        if self.dist.is_main:
            self.tracker.log({k: v for k, v in record.items() if k != "epoch"}, step=0)
        self._write_checkpoint(state, improved=True)
        if self.dist.is_main:
            log.info("epoch 0 (untrained): %s %.4f", self.config.selection_metric, state["best_metric"])


# --------------------------------------------------------------------------- sanity check


def sanity_check(
    model: nn.Module,
    step_fn: StepFn,
    batch: Any,
    steps: int = 300,
    lr: float = 1e-2,
    loss_threshold: float = 0.05,
    device: str | torch.device = "cpu",
) -> tuple[bool, float]:
    """Overfit one batch with Adam; ``(True, loss)`` as soon as the loss drops below ``loss_threshold``.

    A pipeline that cannot overfit a handful of samples has a bug (wrong targets, detached graph,
    broken inputs). Returns ``(reached, final_loss)``; the model is trained in place.
    """
    device = torch.device(device)
    model.to(device).train()
    batch = move_to_device(batch, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = step_fn(model, batch)
        loss_value = float(loss.detach())
        if loss_value < loss_threshold:
            return True, loss_value
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final_loss = float(step_fn(model, batch)[0])
    return final_loss < loss_threshold, final_loss

