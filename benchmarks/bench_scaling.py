"""How the main command's cost grows with the demo's size (issue 21, "How cost grows").

Runs ``run_pipeline.py`` on ``config.yaml`` once per ``--scenes`` value (``demo.scenes_per_group``;
the first is the baseline), each in its own folder under ``--out`` (project root and demo data;
nothing else is written), and prints per stage: wall time, disk written, and both as ratios
against the baseline size; then the largest stage, the SAM cache stage's time and size per image
and per prompt set, and the evaluation's time per test image. Run it alone on the machine: every
stage is timed.
A size whose run finished (``measured.json`` in its folder) is reported again, not rerun.

    python benchmarks/bench_scaling.py --out /tmp/scaling --scenes 8 16 32
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd

REPO = Path(__file__).resolve().parents[1]

#: ``run_pipeline.py``'s line before each stage, and each stage's own last line.
STAGE_START = re.compile(r"INFO pipeline: === (\S+)(?: --model (\w+))?")
STAGE_END = re.compile(r"\[(\w+)\] finished in ([0-9.]+) s")
#: What each stage writes under the project root (glob patterns; disk per stage).
STAGE_OUTPUTS = {
    "build_manifests": ["manifests/*", "data/**/*"],
    "generate_promptsets": ["prompt_sets/**/*"],
    "precompute_sam_outputs": ["sam_cache/**/*"],
    "visualize_sanity": ["reports/debug_panels/**/*"],
    "build_training_indices": ["training_data/*_index.csv"],
    "pack_to_hdf5": ["training_data/*.h5"],
    "train_head:head": ["checkpoints/head/**/*"],
    "train_head:variance": ["checkpoints/variance/**/*"],
    "fit_laplace": ["laplace/**/*"],
    "train_head:fusion": ["checkpoints/fusion/**/*"],
    "evaluate_uncertainty": ["reports/eval/**/*"],
}


def output_bytes(project: Path, patterns: list[str]) -> int:
    files = {item for pattern in patterns for item in project.glob(pattern) if item.is_file()}
    return sum(item.stat().st_size for item in files)


def cached_counts(project: Path) -> dict:
    """Images and prompt sets in the SAM cache's completed entries."""
    counts = {"images": 0, "prompt_sets": 0}
    for shard in (project / "sam_cache").rglob("*.h5"):
        with h5py.File(shard, "r") as handle:
            complete = handle["entries/complete"][:].astype(bool)
            counts["images"] += int(complete.sum())
            counts["prompt_sets"] += int(handle["entries/num_promptsets"][:][complete].sum())
    return counts


def run_size(scenes: int, folder: Path) -> tuple[pd.DataFrame, float, dict]:
    """One main-command run at ``scenes`` scenes per group: the per-stage table, the total wall time,
    and the counts (images, prompt sets) the per-unit costs divide by."""
    project = folder / "project"
    overrides = [f"demo.scenes_per_group={scenes}", f"data.project_root={project}",
                 f"data.images_root={project / 'data' / 'images'}", f"data.masks_root={project / 'data' / 'masks'}"]
    command = [sys.executable, "run_pipeline.py", "--config", "config.yaml",
               *[part for override in overrides for part in ("--set", override)]]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows, current, current_started = [], None, started
    log = (folder / "pipeline.log").open("w", buffering=1)  # line-buffered: tail -f shows progress
    for line in process.stdout:
        log.write(line)
        match = STAGE_START.search(line)
        if match:
            stem = Path(match.group(1)).stem
            current = f"{stem}:{match.group(2)}" if match.group(2) else stem
            current_started = time.perf_counter()
            continue
        match = STAGE_END.search(line)
        if match and current is not None:
            rows.append({"stage": current, "wall_s": time.perf_counter() - current_started,
                         "in_stage_s": float(match.group(2))})
            current = None
    log.close()
    if process.wait() != 0:
        raise SystemExit(f"run_pipeline.py failed at {scenes} scenes per group; see {folder / 'pipeline.log'}")
    total = time.perf_counter() - started
    table = pd.DataFrame(rows)
    table["disk_mib"] = [output_bytes(project, STAGE_OUTPUTS.get(stage, [])) / 2 ** 20 for stage in table["stage"]]
    counts = cached_counts(project)
    return table, total, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="an empty folder for the runs")
    parser.add_argument("--scenes", type=int, nargs="+", default=[8, 16, 32],
                        help="demo.scenes_per_group values; the first is the baseline")
    args = parser.parse_args()
    results = {}
    for scenes in args.scenes:
        folder = args.out / f"scenes_{scenes}"
        folder.mkdir(parents=True, exist_ok=True)
        measured = folder / "measured.json"
        if measured.is_file():  # a finished size is reported again, not rerun
            saved = json.loads(measured.read_text())
            results[scenes] = pd.DataFrame(saved["stages"]), saved["total_s"], saved["counts"]
        else:
            results[scenes] = run_size(scenes, folder)
            table, total, counts = results[scenes]
            measured.write_text(json.dumps({"stages": table.to_dict("records"), "total_s": total, "counts": counts}))
        table, total, counts = results[scenes]
        print(f"{scenes} scenes per group: {total:.0f} s, {counts['images']} images, "
              f"{counts['prompt_sets']} prompt sets cached", flush=True)
    base_table, base_total, _ = results[args.scenes[0]]
    base = base_table.set_index("stage")
    merged = []
    for scenes, (table, total, counts) in results.items():
        for row in table.itertuples():
            merged.append({"scenes": scenes, "stage": row.stage, "wall_s": round(row.wall_s, 1),
                           "x_time": round(row.wall_s / base.at[row.stage, "wall_s"], 2),
                           "disk_mib": round(row.disk_mib, 2),
                           "x_disk": round(row.disk_mib / base.at[row.stage, "disk_mib"], 2)
                           if base.at[row.stage, "disk_mib"] > 0 else float("nan")})
        merged.append({"scenes": scenes, "stage": "total", "wall_s": round(total, 1),
                       "x_time": round(total / base_total, 2), "disk_mib": round(table["disk_mib"].sum(), 2),
                       "x_disk": round(table["disk_mib"].sum() / base_table["disk_mib"].sum(), 2)})
    report = pd.DataFrame(merged)
    print(report.pivot(index="stage", columns="scenes", values=["wall_s", "x_time"]).to_string())
    print(report.pivot(index="stage", columns="scenes", values=["disk_mib", "x_disk"]).to_string())
    report.to_csv(args.out / "scaling.csv", index=False)
    for scenes, (table, total, counts) in results.items():
        project = args.out / f"scenes_{scenes}" / "project"
        evaluated = len(pd.read_csv(project / "manifests" / "test.csv"))
        stage_time = table.set_index("stage")["wall_s"]
        cache = table.loc[table["stage"] == "precompute_sam_outputs", "disk_mib"].sum()
        largest = stage_time.idxmax()
        print(f"{scenes} scenes: largest stage {largest} ({stage_time[largest]:.0f} s); evaluation "
              f"{stage_time['evaluate_uncertainty'] / evaluated:.1f} s per test image ({evaluated}); SAM cache stage "
              f"{stage_time['precompute_sam_outputs'] / counts['images']:.2f} s per image, "
              f"{stage_time['precompute_sam_outputs'] / max(counts['prompt_sets'], 1):.3f} s per prompt set, "
              f"{cache / counts['images']:.2f} MiB per image, {cache * 1024 / max(counts['prompt_sets'], 1):.0f} KiB "
              f"per prompt set")

if __name__ == "__main__":
    main()
