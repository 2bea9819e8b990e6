"""The resumable training loop: learning, exact resume after SIGKILL, commit point, DDP, sanity check."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modules.training.losses import BceDiceLoss, McLogitNoiseLoss, hard_iou
from modules.training.models import PromptAwareHead, VarianceNetwork
from modules.training.distributed import EpochSeededSampler
from modules.training.run_state import (
    BEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    ResumeError,
    TrainingError,
    capture_rng_state,
    restore_rng_state,
)
from modules.training.trainer import Trainer, TrainerConfig, sanity_check
from tests.helpers.train_synthetic import (
    SyntheticSegmentation,
    build_trainer,
    make_step_fn,
    make_synthetic_split,
    write_synthetic_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FILES = (MODEL_FILE, BEST_FILE, OPTIMIZER_FILE, SCALER_FILE, SCHEDULER_FILE)


class RecordingTracker:
    """A NullTracker that remembers its calls."""

    def __init__(self) -> None:
        self.logged: list[tuple[int | None, dict]] = []
        self.artifacts: list[dict] = []
        self.watched = 0

    def log(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_artifact(self, path, name, type, aliases):
        self.artifacts.append({"path": Path(path), "name": name, "type": type, "aliases": list(aliases)})

    def watch(self, model):
        self.watched += 1


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run_helper(data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tests.helpers.train_synthetic", "--data", str(data), "--run-dir", str(run_dir), *extra]
    return subprocess.run(command, cwd=REPO_ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=120)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    weights_a, weights_b = _load(a), _load(b)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=1e-6, rtol=0, msg=name)


@pytest.fixture(autouse=True)
def single_intra_op_thread():
    """Tiny convolutions on a shared 2-core machine run far faster (and steadier) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "data.pt"
    write_synthetic_dataset(path, num_train=48, num_val=16, size=16, seed=0)
    return path


@pytest.fixture(scope="module")
def straight_run(synthetic_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = _run_helper(synthetic_data, run_dir, "--epochs", "4")
    assert result.returncode == 0, result.stderr
    return run_dir


# --------------------------------------------------------------------------- building blocks


def test_epoch_sampler_is_a_pure_function_of_seed_and_epoch():
    first, second = EpochSeededSampler(20, seed=7), EpochSeededSampler(20, seed=7)
    orders = []
    for epoch in (1, 2):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        order = list(first)
        assert order == list(second) and sorted(order) == list(range(20))
        orders.append(order)
    assert orders[0] != orders[1]
    first.set_epoch(1)
    assert list(first) == orders[0]


def test_rng_state_roundtrips_through_json():
    import random

    import numpy as np

    state = json.loads(json.dumps(capture_rng_state(torch.device("cpu"))))
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    restore_rng_state(state)
    assert random.random() == expected[0]
    assert float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


# --------------------------------------------------------------------------- learning


def test_training_improves_val_iou_and_writes_loadable_checkpoints(tmp_path):
    data_path = tmp_path / "data.pt"
    write_synthetic_dataset(data_path, num_train=64, num_val=16, size=16, seed=3)
    tracker = RecordingTracker()
    trainer = build_trainer(data_path, tmp_path / "run", epochs=8, tracker=tracker)
    val = trainer.val_dataset
    with torch.no_grad():
        untrained_iou = hard_iou(trainer.model(val.inputs), val.target).mean().item()
        thresholded_input_iou = hard_iou(val.inputs[:, :1], val.target).mean().item()

    result = trainer.fit()

    assert result.epochs_completed == 8 and not result.stopped_early
    assert result.best_metric > untrained_iou + 0.15
    assert result.best_metric > thresholded_input_iou + 0.1  # it learned to denoise, not to copy
    best = PromptAwareHead(hidden_channels=4)
    best.load_state_dict(_load(result.best_path))
    with torch.no_grad():
        assert hard_iou(best(val.inputs), val.target).mean().item() == pytest.approx(result.best_metric, abs=1e-6)

    for name in CHECKPOINT_FILES:
        _load(tmp_path / "run" / name)  # weights_only=True must accept every file
    state = json.loads((tmp_path / "run" / STATE_FILE).read_text())
    assert state["epoch"] == 8 and state["best_epoch"] == result.best_epoch and state["data_order_seed"] == 0
    assert [record["epoch"] for record in state["history"]] == list(range(1, 9))
    assert all(0.0 <= record["data_wait_fraction"] <= 1.0 for record in state["history"])
    assert not list((tmp_path / "run").glob(".pending_epoch_*"))

    assert [step for step, _ in tracker.logged] == list(range(1, 9))
    expected_keys = {"train_loss", "val_loss", "val_iou", "val_dice", "best_val_iou", "lr", "patience_counter", "data_wait_fraction"}
    assert expected_keys <= set(tracker.logged[-1][1])
    lrs = [metrics["lr"] for _, metrics in tracker.logged]
    assert lrs[0] == pytest.approx(1e-2) and all(a > b for a, b in zip(lrs, lrs[1:]))  # cosine decay
    assert tracker.watched == 1
    assert tracker.artifacts == [{
        "path": tmp_path / "run" / BEST_FILE, "name": "run-best", "type": "model",
        "aliases": ["best", f"epoch-{result.best_epoch}"],
    }]


def test_early_stopping_and_resuming_a_finished_run(tmp_path):
    data_path = tmp_path / "data.pt"
    write_synthetic_dataset(data_path, num_train=16, num_val=8, size=8, seed=1)
    # lr = 0: the weights never change, so val IoU never improves after epoch 1.
    result = build_trainer(data_path, tmp_path / "run", epochs=10, patience=2, lr=0.0).fit()
    assert result.stopped_early and result.epochs_completed == 3 and result.best_epoch == 1
    assert [record["patience_counter"] for record in result.history] == [0, 1, 2]

    tracker = RecordingTracker()
    resumed = build_trainer(data_path, tmp_path / "run", epochs=10, patience=2, lr=0.0, tracker=tracker).fit(resume=True)
    assert resumed.epochs_completed == 3 and tracker.logged == [] and tracker.artifacts == []


def test_validate_initial_keeps_the_starting_model_unless_training_beats_it(tmp_path):
    data_path = tmp_path / "data.pt"
    write_synthetic_dataset(data_path, num_train=16, num_val=8, size=8, seed=1)

    class CrashAfterCommit(Exception):
        pass

    def crash_after_epoch_zero_commit(event, epoch):
        if (event, epoch) == ("committed", 0):
            raise CrashAfterCommit

    # lr = 0: training never beats the starting model, so best.pt must stay the epoch-0 weights,
    # also when the run dies between the epoch-0 commit and the publishing of its files.
    with pytest.raises(CrashAfterCommit):
        build_trainer(data_path, tmp_path / "frozen", epochs=2, lr=0.0, validate_initial=True,
                      checkpoint_hook=crash_after_epoch_zero_commit).fit()
    initial = {name: value.clone() for name, value in
               build_trainer(data_path, tmp_path / "unused", epochs=2).model.state_dict().items()}
    tracker = RecordingTracker()
    result = build_trainer(data_path, tmp_path / "frozen", epochs=2, lr=0.0, validate_initial=True,
                           tracker=tracker).fit(resume=True)
    assert result.best_epoch == 0 and [record["epoch"] for record in result.history] == [0, 1, 2]
    assert [record["patience_counter"] for record in result.history] == [0, 1, 2]
    assert result.best_metric == pytest.approx(result.history[0]["val_iou"])
    best = _load(tmp_path / "frozen" / BEST_FILE)
    for name, value in initial.items():
        torch.testing.assert_close(best[name], value, atol=0, rtol=0)
    assert [step for step, _ in tracker.logged] == [1, 2]  # epoch 0 was logged before the crash

    # A learning run replaces it as soon as an epoch does better on validation.
    learned = build_trainer(data_path, tmp_path / "learning", epochs=3, validate_initial=True,
                            tracker=RecordingTracker()).fit()
    assert learned.history[0]["epoch"] == 0 and learned.best_epoch > 0
    assert learned.best_metric > learned.history[0]["val_iou"]


def test_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path):
    data_path = tmp_path / "data.pt"
    write_synthetic_dataset(data_path, num_train=8, num_val=4, size=8)
    build_trainer(data_path, tmp_path / "run", epochs=1).fit()
    with pytest.raises(TrainingError, match=STATE_FILE):
        build_trainer(data_path, tmp_path / "run", epochs=1).fit()


def test_trains_a_variance_network_on_a_frozen_head_selecting_by_val_loss(tmp_path):
    train = SyntheticSegmentation(**make_synthetic_split(32, 16, seed=4))
    val = SyntheticSegmentation(**make_synthetic_split(16, 16, seed=5))
    torch.manual_seed(0)
    frozen_head = PromptAwareHead(hidden_channels=4).requires_grad_(False).eval()
    loss_fn = McLogitNoiseLoss(num_samples=8)

    def variance_step(model, batch):
        with torch.no_grad():
            map_logits = frozen_head(batch["inputs"])
        log_var = model(VarianceNetwork.build_inputs(batch["inputs"], map_logits))
        return loss_fn(map_logits, log_var, batch["target"]), log_var

    def variance_metrics(log_var):
        return {"mean_log_var": log_var.flatten(1).mean(dim=1)}

    config = TrainerConfig(batch_size=8, lr=1e-2, num_epochs=4, early_stop_patience=None,
                           selection_metric="val_loss", selection_mode="min", show_progress=False)
    trainer = Trainer(VarianceNetwork(channels_in=4, hidden_channels=4), variance_step, train, val, config,
                      tmp_path / "variance", tracker=RecordingTracker(), metric_fn=variance_metrics)
    result = trainer.fit()
    losses = [record["val_loss"] for record in result.history]
    assert losses[-1] < losses[0]
    assert result.best_metric == min(losses)
    assert "best_val_loss" in result.history[-1] and "val_mean_log_var" in result.history[-1]


# --------------------------------------------------------------------------- exact resume after SIGKILL


def test_resume_after_sigkill_reproduces_straight_run(synthetic_data, straight_run, tmp_path):
    """One run killed three times at three different checkpoint stages, resumed each time."""
    run_dir = tmp_path / "run"
    kills = [
        # (kill point, epoch committed on disk afterwards, pending folder left behind)
        ("staged:last.pt@2", 1, True),  # mid-write, before the commit: epoch 2 is redone
        ("committed@2", 2, True),  # after the commit, before the new .pt files were renamed into place
        ("published@3", 3, False),  # right after epoch 3's checkpoint was complete
    ]
    for attempt, (kill_at, committed_epoch, pending_left) in enumerate(kills):
        resume_flag = ["--resume"] if attempt else []
        killed = _run_helper(synthetic_data, run_dir, "--epochs", "4", "--kill-at", kill_at, *resume_flag)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
        assert json.loads((run_dir / STATE_FILE).read_text())["epoch"] == committed_epoch, kill_at
        assert bool(list(run_dir.glob(".pending_epoch_*"))) == pending_left, kill_at

    resumed = _run_helper(synthetic_data, run_dir, "--epochs", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run_dir.glob(".pending_epoch_*"))
    _assert_same_weights(straight_run / MODEL_FILE, run_dir / MODEL_FILE)
    _assert_same_weights(straight_run / BEST_FILE, run_dir / BEST_FILE)
    history_straight = json.loads((straight_run / STATE_FILE).read_text())["history"]
    history_resumed = json.loads((run_dir / STATE_FILE).read_text())["history"]
    for key in ("train_loss", "val_loss", "val_iou", "lr"):
        assert [r[key] for r in history_resumed] == pytest.approx([r[key] for r in history_straight], abs=1e-6)
    # Every epoch reaches the tracker at least once; an epoch redone after a crash logs identical values.
    logged: dict[int, list[dict]] = {}
    for line in (run_dir / "tracker_rank0.jsonl").read_text().splitlines():
        call = json.loads(line)
        if call["call"] == "log":
            logged.setdefault(call["step"], []).append(call["metrics"])
    assert sorted(logged) == [1, 2, 3, 4]
    assert [len(logged[step]) for step in (1, 2, 3, 4)] == [1, 2, 1, 1]
    assert logged[2][0]["val_iou"] == pytest.approx(logged[2][1]["val_iou"], abs=1e-6)


@pytest.mark.parametrize("missing", [STATE_FILE, MODEL_FILE, BEST_FILE, OPTIMIZER_FILE, SCALER_FILE, SCHEDULER_FILE])
def test_resume_with_a_missing_file_names_it(straight_run, synthetic_data, tmp_path, missing):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    (run_dir / missing).unlink()
    with pytest.raises(ResumeError, match=rf"{missing}: missing"):
        build_trainer(synthetic_data, run_dir, epochs=4, tracker=RecordingTracker()).fit(resume=True)


def test_resume_refuses_changed_settings(straight_run, synthetic_data, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    with pytest.raises(ResumeError, match="seed"):
        build_trainer(synthetic_data, run_dir, epochs=4, seed=1, tracker=RecordingTracker()).fit(resume=True)


# --------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_ranks_split_the_data_and_only_rank_zero_writes(synthetic_data, tmp_path):
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "tests.helpers.train_synthetic", "--data", str(synthetic_data), "--run-dir", str(run_dir),
        "--epochs", "1", "--record-indices",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    seen = [json.loads((run_dir / f"seen_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 24
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(48))

    assert (run_dir / "checkpoint_events_rank0.txt").read_text().splitlines()[-1] == "published@1"
    assert not (run_dir / "checkpoint_events_rank1.txt").exists()
    assert (run_dir / "tracker_rank0.jsonl").exists() and not (run_dir / "tracker_rank1.jsonl").exists()
    for name in CHECKPOINT_FILES:
        _load(run_dir / name)

    # Validation was sharded across ranks and all-reduced: it must equal a full pass on one process.
    data = _load(synthetic_data)
    model = PromptAwareHead(hidden_channels=4)
    model.load_state_dict(_load(run_dir / MODEL_FILE))
    with torch.no_grad():
        full_iou = hard_iou(model(data["val_inputs"]), data["val_target"]).mean().item()
    assert json.loads((run_dir / STATE_FILE).read_text())["history"][0]["val_iou"] == pytest.approx(full_iou, abs=1e-6)


# --------------------------------------------------------------------------- sanity check


def test_sanity_check_overfits_a_tiny_batch():
    split = make_synthetic_split(4, 16, seed=9, noise_std=1.0)
    batch = {"inputs": split["inputs"], "target": split["target"], "index": torch.arange(4)}
    step_fn = make_step_fn(BceDiceLoss(0.5), None)
    torch.manual_seed(0)
    reached, final_loss = sanity_check(PromptAwareHead(hidden_channels=8), step_fn, batch, steps=300, lr=1e-2, loss_threshold=0.1)
    assert reached and final_loss < 0.1
    torch.manual_seed(0)
    reached, final_loss = sanity_check(PromptAwareHead(hidden_channels=8), step_fn, batch, steps=5, lr=1e-2, loss_threshold=0.0)
    assert not reached and final_loss > 0.0
