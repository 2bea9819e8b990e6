"""Loader throughput: the packed per-split HDF5 file (stage 4.5) vs the seed's one-file-per-array layout.

Builds a project in a temporary folder: the procedural demo data set (stage 1), seeded prompt sets
(stage 2), a SAM cache with seeded random logits written through ``shard_writer.ShardWriter`` (the
loader's speed does not depend on the logit values, and the demo backbone would take minutes on
a small CPU), then stages 4 and 4.5. From the same rows it writes the seed's layout
(``<safe_id>/promptset_NNNN/{logits_256,pos_map,neg_map}.npy``, float16, plus the original mask
file read and resized per item) and measures:

1. items/s through a ``DataLoader`` (batch 8, shuffled, workers 0 and 2; worker start-up counted)
   for the packed file read from disk and in memory, item-wise (``PackedSplitDataset``) and batch
   at once in the stored dtypes (``PackedBatches``, what training uses; also with the float32
   conversion done in the main process), and the seed layout, with warm
   page caches and with cold ones (every file the source reads is evicted from the page cache
   with ``posix_fadvise(DONTNEED)`` before each pass; only this benchmark's files are touched);
2. one training epoch of the seed head (Conv 3->16->16->1, BCE + Dice, CPU) with
   ``modules.training.trainer.Trainer``, reporting its ``data_wait_fraction`` for each source.

float16 -> float32 is converted with torch (numpy's conversion is ~10x slower and would dominate).
``--threads`` sets torch's intra-op threads in the main process (default 1: on a small shared machine, OpenMP threads that wait for busy cores make a 6 MB ``torch.stack`` take
100 ms instead of 1 ms).

    python benchmarks/bench_loader.py [--scenes-per-group 8] [--repeats 3] [--train-rows 96] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.cache import packed_reader  # noqa: E402
from modules.cache import training_index  # noqa: E402
from modules.data.imageio import read_mask, resize_mask_nearest  # noqa: E402
from modules.core.tracking import NullTracker  # noqa: E402
from tests.helpers.precompute_fixtures import save_random_checkpoint  # noqa: E402
from tests.stage_runner import run_stage, write_config  # noqa: E402
from tests.test_packing import write_fixture_cache  # noqa: E402
from modules.core.paths import packed_path  # noqa: E402

BATCH_SIZE = 8
SEED_ARRAYS = ("logits_256", "pos_map", "neg_map")


def build_project(folder: Path, scenes_per_group: int) -> Path:
    """Demo data, stages 1-2, a fixture SAM cache, stages 4 and 4.5; returns the config path."""
    checkpoint = save_random_checkpoint("sam", "demo_tiny", folder / "demo_tiny.pt")
    config = write_config(folder, folder / "data" / "images", folder / "data" / "masks", {
        "demo": {"enabled": True, "scenes_per_group": scenes_per_group},
        "prompt_generation": {"num_promptsets_train": 10, "num_promptsets_val": 4, "num_promptsets_test": 4,
                              "max_pairs": 10},
        "sam": {"checkpoint": str(checkpoint)},
    })
    for script in ("build_manifests.py", "generate_promptsets.py"):
        run_stage(script, config)
    write_fixture_cache(config, skip=())
    for script in ("build_training_indices.py", "pack_to_hdf5.py"):
        run_stage(script, config)
    return config


# --------------------------------------------------------------------------- the seed's layout


def write_seed_layout(packed: packed_reader.PackedSplitDataset, folder: Path, masks_root: Path) -> list[dict]:
    """One ``.npy`` per array per prompt set, as the seed's stage 3 stored them; returns index rows
    (``mask_path`` resolved under ``masks_root``, as the index stores it relative to the root)."""
    rows = []
    for row in packed.index.to_dict("records"):
        item = packed[len(rows)]
        target = folder / row["safe_id"] / f"promptset_{row['promptset_id']:04d}"
        target.mkdir(parents=True, exist_ok=True)
        for channel, name in enumerate(SEED_ARRAYS):
            np.save(target / f"{name}.npy", item["inputs"][channel].numpy().astype(np.float16))
        rows.append({"folder": target, "mask_path": masks_root / row["mask_path"],
                     "image_hw": (row["image_h"], row["image_w"])})
    return rows


class SeedLayoutDataset(Dataset):
    """The seed's per-item work: three ``np.load`` calls, clip, and the mask read and resized."""

    def __init__(self, rows: list[dict], logit_clip: float = 20.0, mask_threshold: int = 127):
        self.rows, self.logit_clip, self.mask_threshold = rows, logit_clip, mask_threshold

    def __len__(self) -> int:
        return len(self.rows)

    def files(self) -> list[Path]:
        """Every file an epoch reads."""
        arrays = [row["folder"] / f"{name}.npy" for row in self.rows for name in SEED_ARRAYS]
        return arrays + sorted({Path(row["mask_path"]) for row in self.rows})

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        stacked = torch.from_numpy(np.stack([np.load(row["folder"] / f"{name}.npy") for name in SEED_ARRAYS])).float()
        stacked[0].clamp_(-self.logit_clip, self.logit_clip)
        mask = read_mask(row["mask_path"], self.mask_threshold)
        if mask.shape != row["image_hw"]:
            mask = resize_mask_nearest(mask, row["image_hw"])
        target = torch.from_numpy(resize_mask_nearest(mask, (256, 256))).float()[None]
        return {"inputs": stacked, "target": target, "index": index}


# --------------------------------------------------------------------------- measurements


def evict_from_page_cache(paths: list[Path]) -> None:
    """Drop these files' pages from the OS page cache (written pages are synced first)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass
class PassTiming:
    items_per_s: float          # after the first batch arrived (steady state)
    first_batch_s: float        # loader start (worker start-up) until the first batch


@dataclass
class Source:
    label: str
    datasets: dict[str, Dataset]  # split -> dataset
    files: list[Path] | None  # what a pass reads (None: in memory, no cold-cache measurement)
    collate_fn: object = None  # None: default collation of items
    convert: bool = False  # convert each batch to float32 in the main process (timed)


def loader_throughput(source: Source, workers: int, repeats: int, cold: bool = False) -> PassTiming:
    """Medians over full shuffled passes of the train split; with ``cold`` the source's files are
    evicted before each pass, otherwise one untimed pass warms the page cache first."""
    dataset = source.datasets["train"]

    def one_pass() -> PassTiming:
        if cold:
            evict_from_page_cache(source.files)
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers,
                            collate_fn=source.collate_fn, generator=torch.Generator().manual_seed(0))
        started = time.perf_counter()
        batches = iter(loader)
        next(batches)
        first = time.perf_counter()
        count = 0
        for batch in batches:
            if source.convert:
                batch = packed_reader.as_float32(batch)
            count += len(batch["index"])
        return PassTiming(count / (time.perf_counter() - first), first - started)

    if not cold:
        one_pass()
    timings = [one_pass() for _ in range(repeats)]
    return PassTiming(statistics.median(t.items_per_s for t in timings),
                      statistics.median(t.first_batch_s for t in timings))


def training_epoch(train: Dataset, val: Dataset, workers: int, run_dir: Path, collate_fn=None) -> dict:
    """One epoch of the seed head through ``modules.training.trainer.Trainer`` on CPU (fp32)."""
    from modules.training.losses import BceDiceLoss
    from modules.training.models import PromptAwareHead
    from modules.training.trainer import Trainer, TrainerConfig

    loss_fn = BceDiceLoss(0.5)

    def step_fn(model, batch):
        batch = packed_reader.as_float32(batch)  # what the head task does; a no-op for float32 items
        logits = model(batch["inputs"])
        return loss_fn(logits, batch["target"]), (logits, batch["target"])

    torch.manual_seed(0)
    config = TrainerConfig(batch_size=BATCH_SIZE, num_workers=workers, num_epochs=1, amp=False,
                           early_stop_patience=None, show_progress=False)
    trainer = Trainer(PromptAwareHead(hidden_channels=16), step_fn, train, val, config, run_dir,
                      tracker=NullTracker(), device="cpu", collate_fn=collate_fn)
    record = trainer.fit().history[0]
    return {"data_wait_fraction": record["data_wait_fraction"], "epoch_time_s": record["epoch_time_s"],
            "train_time_s": record["data_wait_s"] + record["compute_s"]}


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {gpu}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes-per-group", type=int, default=8, help="demo scenes per group (6 groups)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (median)")
    parser.add_argument("--train-rows", type=int, default=96, help="rows of the training-epoch measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the main process")
    parser.add_argument("--keep", type=Path, default=None, help="build the project here and keep it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        root = folder / "project"
        if not packed_path(root, "train").is_file():  # --keep DIR of an earlier run: reused
            started = time.perf_counter()
            build_project(folder, args.scenes_per_group)
            print(f"project built in {time.perf_counter() - started:.1f} s: {root}")
        packed = {split: packed_reader.PackedSplitDataset(packed_path(root, split), in_memory=False)
                  for split in ("train", "val")}
        in_memory = {split: packed_reader.PackedSplitDataset(packed_path(root, split), in_memory=True)
                     for split in ("train", "val")}
        if not len(packed["val"]):
            sys.exit(f"error: --scenes-per-group {args.scenes_per_group} leaves the val split empty; "
                     "the training-epoch measurement needs one (3 scenes per group give one)")
        seed = {split: SeedLayoutDataset(write_seed_layout(packed[split], folder / "seed_layout" / split,
                                                          folder / "data" / "masks"))
                for split in ("train", "val")}
        sizes = training_index.load_index(root, "train")[["image_h", "image_w"]]
        print(f"train: {len(packed['train'])} rows ({packed['train'].index['safe_id'].nunique()} images, "
              f"{sizes.min().min()}-{sizes.max().max()} px); machine: {machine()}")

        batches = {split: packed_reader.PackedBatches(dataset) for split, dataset in packed.items()}
        batches_in_memory = {split: packed_reader.PackedBatches(dataset) for split, dataset in in_memory.items()}
        packed_files = [packed_path(root, "train")]
        collate = packed_reader.collate_batch
        sources = {  # key (run folder name) -> Source
            "packed_disk": Source("packed HDF5, from disk, item-wise", packed, packed_files),
            "packed_memory": Source("packed HDF5, in memory, item-wise", in_memory, None),
            "batches_disk": Source("packed HDF5, from disk, batch at once", batches, packed_files, collate),
            "batches_memory": Source("packed HDF5, in memory, batch at once", batches_in_memory, None, collate),
            "batches_disk_f32": Source("packed HDF5, from disk, batch at once + float32 in main", batches,
                                       packed_files, collate, convert=True),
            "batches_memory_f32": Source("packed HDF5, in memory, batch at once + float32 in main",
                                         batches_in_memory, None, collate, convert=True),
            "seed": Source("seed .npy layout", seed, seed["train"].files()),
        }
        warm, cold = {}, {}
        for workers in (0, 2):
            for key, source in sources.items():
                warm[key, workers] = loader_throughput(source, workers, args.repeats)
                if source.files is not None:
                    cold[key, workers] = loader_throughput(source, workers, args.repeats, cold=True)
        print("\nItems/s after the first batch (steady state); first batch = loader start-up until it arrives.")
        print("\n| source | workers | items/s, warm cache | vs seed | items/s, cold cache | vs seed | first batch s (warm) |")
        print("|---|---|---|---|---|---|---|")
        for (key, workers), timing in warm.items():
            rate, seed_rate = timing.items_per_s, warm["seed", workers].items_per_s
            cold_timing = cold.get((key, workers))
            cold_text = (f"{cold_timing.items_per_s:.0f} | {cold_timing.items_per_s / cold['seed', workers].items_per_s:.1f}x"
                         if cold_timing else "- | -")
            print(f"| {sources[key].label} | {workers} | {rate:.0f} | {rate / seed_rate:.1f}x | {cold_text} | "
                  f"{timing.first_batch_s:.2f} |")

        print(f"\nOne training epoch ({args.train_rows} train rows + {args.train_rows // 4} val rows, warm cache):")
        print("\n| source | workers | epoch s (train+val) | train s | data wait fraction |\n|---|---|---|---|---|")
        for workers in (0, 2):
            for key in ("batches_disk", "batches_memory", "seed"):
                source = sources[key]
                train = Subset(source.datasets["train"], range(min(args.train_rows, len(source.datasets["train"]))))
                val = Subset(source.datasets["val"], range(min(args.train_rows // 4, len(source.datasets["val"]))))
                run_dir = folder / "runs" / f"{key}_workers{workers}"
                shutil.rmtree(run_dir, ignore_errors=True)
                result = training_epoch(train, val, workers, run_dir, source.collate_fn)
                print(f"| {source.label} | {workers} | {result['epoch_time_s']:.1f} | {result['train_time_s']:.1f} | "
                      f"{result['data_wait_fraction']:.1%} |")

if __name__ == "__main__":
    main()
