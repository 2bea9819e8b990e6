"""How the Laplace posterior's uncertainty depends on the distance to the clicks (README, "Simulated clicks").

    .venv/bin/python tools/click_proximity.py --config config.yaml --set evaluation.split=val

On a project with a trained head and its last-layer Laplace posterior (``laplace.target: head``), for
each image of the evaluation split: the error oracle's first click and ``--clicks`` random ones
(seeded, each at least ``min_distance`` from the others, as the click simulation's random policy
places them: random, so that no uncertainty policy chose where to look), decoded on the cached
features as the simulation decodes them. Then, at the image's resolution, the mean of each map over
the pixels at each distance from the nearest click (the bands of ``--bands``, in pixels):

- ``mutual_information``, ``total_entropy``, ``expected_entropy``: the posterior's maps (as
  ``laplace.predictive`` computes them), each divided by its image maximum first;
- ``logit_variance``: the per-pixel variance of the last layer's logit under the posterior.

Each band's figure is the mean over images of the per-image means. Prints the table and writes it as
CSV (``--out``, default ``reports/click_proximity.csv`` under the project root).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from modules.cache.training_index import open_cache  # noqa: E402
from modules.core.config import load_config  # noqa: E402
from modules.core.fileio import atomic_write_text  # noqa: E402
from modules.core.errors import PipelineError  # noqa: E402
from modules.core.paths import REPORTS_DIR, ensure_inside  # noqa: E402
from modules.evaluation.methods import STRATEGY_BUILDERS  # noqa: E402
from modules.evaluation.runs import Artifacts, RunIds  # noqa: E402
from modules.evaluation.samples import list_eval_units, load_sample  # noqa: E402
from modules.evaluation.scoreboard import upsample  # noqa: E402
from modules.interactive.simulation import ClickSimulator, ImageRun  # noqa: E402

DEFAULT_BANDS = (0, 4, 8, 12, 16, 24, 32, 48, 64)
NORMALISED_MAPS = ("mutual_information", "total_entropy", "expected_entropy")


def distance_to_clicks(shape: tuple[int, int], clicks: list[tuple[int, int]]) -> np.ndarray:
    """``H x W``: each pixel's Euclidean distance to the nearest click ``(row, col)``."""
    free = np.ones(shape, dtype=bool)
    rows, cols = np.asarray(clicks, dtype=np.int64).T
    free[rows, cols] = False
    return ndimage.distance_transform_edt(free)


def band_means(values: np.ndarray, distance: np.ndarray, bands: tuple[float, ...]) -> list[float]:
    """The mean of ``values`` over the pixels whose ``distance`` lies in each band ``[bands[i],
    bands[i + 1])``, the last band open-ended; NaN for an empty band."""
    edges = [*bands, np.inf]
    return [float(values[inside].mean()) if (inside := (distance >= low) & (distance < high)).any() else np.nan
            for low, high in zip(edges[:-1], edges[1:])]


def image_profile(simulator: ClickSimulator, laplace, run: ImageRun, clicks: int,
                  bands: tuple[float, ...]) -> dict[str, list[float]]:
    """Place ``clicks`` random clicks after the first one, decode, and return each map's band means."""
    simulator.score(run)
    for _ in range(clicks):
        simulator.choose(run)
    lane = run.lanes[0]
    state = simulator.decode(run.sample, run.features, simulator.record(run))
    size = run.sample.original_hw
    with torch.inference_mode():
        output = laplace.predict(state)
        posterior = laplace.posterior
        _, logit_variance = posterior.logit_moments(posterior.prepare(laplace.posterior_inputs([state])))
    distance = distance_to_clicks(size, run.histories[lane].clicks)
    profile = {}
    for name in NORMALISED_MAPS:
        values = upsample(output.maps[name][:1].float().cpu(), size, torch.device("cpu"))[0].numpy()
        profile[name] = band_means(values / max(float(values.max()), 1e-12), distance, bands)
    variance = upsample(logit_variance[:1].float().cpu(), size, torch.device("cpu"))[0].numpy()
    profile["logit_variance"] = band_means(variance, distance, bands)
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--run_id", default="v1")
    parser.add_argument("--clicks", type=int, default=5, help="random clicks after the oracle's first one")
    parser.add_argument("--images", type=int, default=0, help="images of the split (0 = all)")
    parser.add_argument("--bands", default=",".join(map(str, DEFAULT_BANDS)),
                        help="ascending lower edges of the distance bands, pixels")
    parser.add_argument("--out", default=None, help="CSV path inside the project root")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    args = parser.parse_args()
    try:
        bands = tuple(float(edge) for edge in args.bands.split(","))
    except ValueError:
        bands = ()
    if args.clicks < 1 or not bands or list(bands) != sorted(set(bands)) or bands[0] != 0:
        parser.error("--clicks must be at least 1 and --bands ascending lower edges starting at 0")
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.set, "evaluation.active_prompting.policies=[random]",
                                    "evaluation.active_prompting.random_draws=1"])
    if cfg.laplace.target != "head":
        parser.error(f"laplace.target: {cfg.laplace.target!r}; this measures the head's last-layer posterior (head)")
    out = Path(args.out) if args.out else Path(cfg.project_root) / REPORTS_DIR / "click_proximity.csv"
    try:
        out = ensure_inside(cfg.project_root, out, "--out")
    except PipelineError as exc:
        parser.error(str(exc))
    artifacts = Artifacts(cfg, RunIds.resolve(args.run_id), torch.device("cpu"))
    simulator = ClickSimulator(cfg, artifacts)
    laplace = STRATEGY_BUILDERS["laplace"].build(cfg, artifacts)
    cache = open_cache(cfg)
    units = list_eval_units(cfg)[:args.images or None]
    profiles = [image_profile(simulator, laplace, simulator.start(load_sample(cfg, cache, unit), unseen=False),
                              args.clicks, bands) for unit in units]
    names = [f"{low:g}-{high:g} px" for low, high in zip(bands, bands[1:])] + [f">= {bands[-1]:g} px"]
    table = pd.DataFrame({name: np.nanmean([profile[name] for profile in profiles], axis=0)
                          for name in (*NORMALISED_MAPS, "logit_variance")}, index=names).T
    table.index.name = "map"
    print(f"{len(units)} image{'s' if len(units) != 1 else ''} of the {cfg.evaluation.split} split, the oracle's "
          f"first click and {args.clicks} random one{'s' if args.clicks != 1 else ''}; mean per distance to the "
          f"nearest click (maps divided by their image maximum):")
    print(table.round(3).to_string())
    atomic_write_text(out, table.to_csv())
    print(f"written: {out}")


if __name__ == "__main__":
    try:
        main()
    except PipelineError as error:  # a missing run, cache or manifest: one line naming it
        sys.exit(f"error: {error}")
