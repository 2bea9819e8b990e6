"""Train a tiny PromptAwareHead on a synthetic data set; used by tests/test_training.py as a subprocess.

The data set (written by ``write_synthetic_dataset``) is a learnable denoising task: the target is a
random disc, input channel 0 is the target's logit map (+-4) plus strong Gaussian noise, channels 1
and 2 are a positive and a negative Gaussian prompt map. Thresholding channel 0 alone gives a ragged
mask; the 3x3 convolutions learn to smooth it.

Command line (all paths explicit so a test owns every file):
    python -m tests.helpers.train_synthetic --data DATA.pt --run-dir DIR --epochs 4
        [--resume] [--kill-at EVENT@EPOCH] [--record-indices] [--patience N]
``--kill-at committed@2`` sends SIGKILL to this process when the checkpoint hook reports that
event for that epoch (events: staged:<file>, committed, published). With ``--record-indices`` each
rank writes the training sample indices it saw to ``DIR/seen_rank<r>.json``; the tracker's calls
go to ``DIR/tracker_rank<r>.jsonl`` and the checkpoint events a rank saw to
``DIR/checkpoint_events_rank<r>.txt`` (so a test can tell which ranks logged and wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from torch.utils.data import Dataset

from modules.training.losses import BceDiceLoss
from modules.training.models import PromptAwareHead
from modules.training.trainer import Trainer, TrainerConfig


def make_synthetic_split(num_samples: int, size: int, seed: int, noise_std: float = 6.0) -> dict[str, torch.Tensor]:
    """``inputs`` N x 3 x size x size, ``target`` N x 1 x size x size (float {0, 1})."""
    generator = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centres = torch.rand(num_samples, 2, generator=generator) * (size * 0.5) + size * 0.25
    radii = torch.rand(num_samples, generator=generator) * (size * 0.2) + size * 0.15
    distance = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2).sqrt()
    target = (distance < radii[:, None, None]).float().unsqueeze(1)
    noisy_logits = 4.0 * (2.0 * target - 1.0) + noise_std * torch.randn(target.shape, generator=generator)
    positive = torch.exp(-distance.unsqueeze(1) ** 2 / (2 * 2.0**2))
    corner = ((yy - 1.0) ** 2 + (xx - 1.0) ** 2).expand(num_samples, size, size).unsqueeze(1)
    negative = torch.exp(-corner / (2 * 2.0**2))
    inputs = torch.cat([noisy_logits.clamp(-20, 20), positive, negative], dim=1)
    return {"inputs": inputs, "target": target}


def write_synthetic_dataset(path: Path, num_train: int = 48, num_val: int = 16, size: int = 16, seed: int = 0) -> None:
    data = {f"train_{k}": v for k, v in make_synthetic_split(num_train, size, seed).items()}
    data.update({f"val_{k}": v for k, v in make_synthetic_split(num_val, size, seed + 1).items()})
    torch.save(data, path)


class SyntheticSegmentation(Dataset):
    """Items ``{"inputs": 3 x H x W, "target": 1 x H x W, "index": int}``."""

    def __init__(self, inputs: torch.Tensor, target: torch.Tensor) -> None:
        self.inputs, self.target = inputs, target

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict:
        return {"inputs": self.inputs[index], "target": self.target[index], "index": index}


class JsonlTracker:
    """Records every tracker call as one JSON line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._write({"call": "log", "metrics": metrics, "step": step})

    def log_artifact(self, path, name: str, type: str, aliases: list[str]) -> None:
        self._write({"call": "log_artifact", "path": str(path), "name": name, "type": type, "aliases": aliases})

    def watch(self, model) -> None:
        self._write({"call": "watch"})


def make_step_fn(loss_fn: BceDiceLoss, seen_indices: list[int] | None):
    def step_fn(model, batch):
        if seen_indices is not None and model.training:
            seen_indices.extend(int(i) for i in batch["index"])
        logits = model(batch["inputs"])
        return loss_fn(logits, batch["target"]), (logits, batch["target"])

    return step_fn


def build_trainer(
    data_path: Path,
    run_dir: Path,
    epochs: int = 4,
    batch_size: int = 8,
    patience: int | None = None,
    seed: int = 0,
    lr: float = 1e-2,
    tracker=None,
    seen_indices: list[int] | None = None,
    checkpoint_hook=None,
    validate_initial: bool = False,
) -> Trainer:
    """The synthetic run both the subprocess entry point and in-process tests use."""
    data = torch.load(data_path, weights_only=True)
    train = SyntheticSegmentation(data["train_inputs"], data["train_target"])
    val = SyntheticSegmentation(data["val_inputs"], data["val_target"])
    torch.manual_seed(seed)
    model = PromptAwareHead(hidden_channels=4)
    config = TrainerConfig(
        batch_size=batch_size, num_workers=0, lr=lr, weight_decay=1e-4, num_epochs=epochs,
        early_stop_patience=patience, amp=True, seed=seed, show_progress=False, validate_initial=validate_initial,
    )
    rank = int(os.environ.get("RANK", "0"))
    tracker = tracker if tracker is not None else JsonlTracker(run_dir / f"tracker_rank{rank}.jsonl")
    return Trainer(
        model, make_step_fn(BceDiceLoss(0.5), seen_indices), train, val, config, run_dir,
        tracker=tracker, device="cpu", checkpoint_hook=checkpoint_hook,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", default=None, help="EVENT@EPOCH, e.g. committed@2")
    parser.add_argument("--record-indices", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    args.run_dir.mkdir(parents=True, exist_ok=True)
    seen: list[int] | None = [] if args.record_indices else None
    kill_target = None
    if args.kill_at:
        event, epoch = args.kill_at.rsplit("@", 1)
        kill_target = (event, int(epoch))
    events_path = args.run_dir / f"checkpoint_events_rank{rank}.txt"

    def checkpoint_hook(event: str, epoch: int) -> None:
        with open(events_path, "a", encoding="utf-8") as handle:
            handle.write(f"{event}@{epoch}\n")
        if (event, epoch) == kill_target:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = build_trainer(
        args.data, args.run_dir, epochs=args.epochs, batch_size=args.batch_size, patience=args.patience,
        seed=args.seed, seen_indices=seen, checkpoint_hook=checkpoint_hook,
    )
    trainer.fit(resume=args.resume)
    if seen is not None:
        (args.run_dir / f"seen_rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
