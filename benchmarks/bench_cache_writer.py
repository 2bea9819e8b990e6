"""Stage 3's cache writers: how much the writing of the shard file slows the stage's main thread.

On a GPU, stage 3's main thread launches the encoder and decoder kernels and copies their outputs;
that is Python work that needs the GIL. h5py holds the GIL while HDF5 writes, so a writer *thread*
takes turns with it; the writer *process* (``sam.cache_writer: process``) does not. This benchmark
stands in for the GPU with main-thread work that needs the GIL (small torch operations, as a kernel
launch is) and measures, for entries of each backbone's real cache shapes written through
``ShardWriter`` to a shard file on disk (data, fsync, read-back check, flags):

1. the main thread's work alone (what an encoder-bound stage 3 would take: the ceiling, "a");
2. the same work with each writer writing one batch per step in the background ("b"); b/a is
   what the writer leaves of the ceiling (the last batch's write cannot overlap any work, so a
   fully hidden writer gives N/(N+1) for N batches);
3. the main thread's time per batch for the host copies of the batch (the stage's device-to-host
   copies: into the writer process's shared memory, else into new arrays) and ``put``, and the
   writer's start (the process's is paid once per stage run, not in 2).

The main-thread work per step is sized to the thread writer's time for one batch measured first, so
the disk and the encoder are about equally fast: the case where overlapping them matters most.

    python benchmarks/bench_cache_writer.py [--batches 8] [--batch-size 4] [--promptsets 8] [--repeats 3] [--folder DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.cache.cache_writers import CACHE_WRITERS, plain_array  # noqa: E402
from modules.cache.sam_cache import CacheEntry, ShardLayout  # noqa: E402
from modules.cache.shard_writer import ShardWriter  # noqa: E402

#: Encoder feature shapes of each backbone's cache entry (C x h x w, float16).
FEATURE_SHAPES = {
    "sam vit_h": (("image_embed", (256, 64, 64)),),
    "sam2 hiera_l": (("image_embed", (256, 64, 64)), ("high_res_feats_0", (32, 256, 256)),
                     ("high_res_feats_1", (64, 128, 128))),
}


def make_entries(shapes, count: int, promptsets: int) -> list[CacheEntry]:
    rng = np.random.default_rng(0)
    return [CacheEntry(f"s{i}", "train", {name: rng.standard_normal(shape).astype(np.float16) for name, shape in shapes},
                       rng.standard_normal((promptsets, 256, 256)).astype(np.float16),
                       np.arange(promptsets, dtype=np.int32), np.zeros(promptsets, np.int8),
                       rng.random((promptsets, 3)).astype(np.float32), (768, 1024), (768, 1024), "0" * 32)
            for i in range(count)]


def layout(shapes, count: int, promptsets: int) -> ShardLayout:
    return ShardLayout("sam-bench-0123456789ab", "sam", "bench", "0123456789ab" * 2, 0, 1,
                       tuple(("train", f"s{i}") for i in range(count)), shapes, promptsets, 3)


def main_thread_work(operations: int, tensor: torch.Tensor) -> None:
    for _ in range(operations):
        tensor.add_(1)


def host_batch(batch: list[CacheEntry], host_array) -> list[CacheEntry]:
    """The batch as the stage's device-to-host copies make it: every array copied into
    ``host_array``'s memory (the writer process's shared memory, else new arrays)."""
    def copied(value: np.ndarray) -> np.ndarray:
        out = host_array(value.shape, value.dtype)
        np.copyto(out, value)
        return out

    return [dataclasses.replace(entry, features={k: copied(v) for k, v in entry.features.items()},
                                logits=copied(entry.logits), branch_index=copied(entry.branch_index),
                                iou_predictions=copied(entry.iou_predictions)) for entry in batch]


def run(kind: str | None, folder: Path, shard_layout: ShardLayout, batches: list, operations: int) -> dict:
    """One stage-3-like loop: work, the batch's host copies, then ``put`` it. ``kind`` None: the work
    and the copies alone."""
    shutil.rmtree(folder, ignore_errors=True)
    tensor = torch.zeros(8)
    started = time.perf_counter()
    background = None
    if kind is not None:
        background = CACHE_WRITERS[kind](ShardWriter.open(folder, shard_layout, {}), lambda n: None,
                                         batch_size=len(batches[0]))
        background.flush()
    start_s = time.perf_counter() - started
    put_s = 0.0
    started = time.perf_counter()
    for batch in batches:
        main_thread_work(operations, tensor)
        before = time.perf_counter()
        batch = host_batch(batch, background.host_arrays() if background is not None else plain_array)
        if background is not None:
            background.put(batch)
        put_s += time.perf_counter() - before
    if background is not None:
        background.close()
    wall = time.perf_counter() - started
    if background is not None:
        background.release().close()
    return {"wall": wall, "put": put_s / len(batches), "start": start_s}


def best(results: list[dict]) -> dict:
    return min(results, key=lambda r: r["wall"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--promptsets", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="where the shard files go (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_cache_writer_", dir=args.folder))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}, torch {torch.__version__}; shard files under {root}")
    try:
        for name, shapes in FEATURE_SHAPES.items():
            count = args.batches * args.batch_size
            entries = make_entries(shapes, count, args.promptsets)
            batches = [entries[i:i + args.batch_size] for i in range(0, count, args.batch_size)]
            shard_layout = layout(shapes, count, args.promptsets)
            size = sum(v.nbytes for v in entries[0].features.values()) + entries[0].logits.nbytes
            writes = best([run("thread", root / "calibrate", shard_layout, batches, 0) for _ in range(args.repeats)])
            per_batch = writes["wall"] / len(batches)
            tensor = torch.zeros(8)
            probe = 20000
            before = time.perf_counter()
            main_thread_work(probe, tensor)
            operations = max(1, int(probe * per_batch / (time.perf_counter() - before)))
            print(f"\n{name}: {size / 2**20:.1f} MiB per entry, {len(batches)} batches of {args.batch_size}; "
                  f"writing a batch alone: {per_batch * 1000:.0f} ms; main-thread work per step sized to it "
                  f"({operations} torch ops)")
            alone = best([run(None, root / "alone", shard_layout, batches, operations) for _ in range(args.repeats)])
            print(f"  {'writer':<8} {'wall s':>7} {'b/a':>6} {'copy+put ms':>13} {'writer start s':>15}")
            print(f"  {'none':<8} {alone['wall']:>7.3f} {1.0:>6.2f} {alone['put'] * 1000:>13.1f} {'':>15}")
            for kind in ("thread", "process"):
                result = best([run(kind, root / kind, shard_layout, batches, operations) for _ in range(args.repeats)])
                print(f"  {kind:<8} {result['wall']:>7.3f} {alone['wall'] / result['wall']:>6.2f} "
                      f"{result['put'] * 1000:>13.1f} {result['start']:>15.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
