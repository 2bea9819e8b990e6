"""Stage 6: fit the last-layer Laplace posterior, tune its prior, save it, and check it is worth having.

Artifacts in ``<project_root>/laplace/<target>/run_<id>/``: ``laplace_state.pt``, ``laplace_config.yaml``,
``posterior_meta.json`` (see ``modules/laplace_posterior``), ``prior_precision_nll.csv`` and
``prior_precision_nll.png``, and ``quality.json`` (the checks below). The fit is skipped when the
artifacts exist and were fitted on the same checkpoint (md5); a different checkpoint is an error
until ``--force`` refits.

Quality checks on the validation split (printed and logged): NLL and ECE of the Laplace predictive
(probit) against the MAP head, and the mean mutual information on pixels the MAP head gets wrong
against those it gets right.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from modules.laplace import posterior as lp
from modules.core.errors import PipelineError
from modules.core.fileio import atomic_write_csv, atomic_write_json, cached_file_md5, read_json
from modules.stages.train_head import load_trained_head, packed_datasets
from modules.core.device import resolve_device
from modules.core.paths import laplace_run_dir

ARTIFACTS = ("laplace_state.pt", "laplace_config.yaml", "posterior_meta.json")


class HeadSamples:
    """A packed split seen as ``(x 3 x H x W, target H x W[, image_embedding])`` float32 samples."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        sample = (item["inputs"].float(), item["target"][0].float())
        if "image_embedding" in item:
            sample += (item["image_embedding"].float(),)
        return sample


def already_fitted(ctx, checkpoint: Path | str, checkpoint_md5: str) -> bool:
    """True when the run folder holds a complete posterior fitted on this checkpoint (skip it).

    Artifacts fitted on another checkpoint are an error until ``--force``; ``--force`` refits.
    """
    folder = ctx.output_dir
    if ctx.force or not all((folder / name).is_file() for name in ARTIFACTS):
        return False
    meta = read_json(folder / lp.META_FILE)
    fitted_on = meta.get("source_checkpoint_md5")
    if fitted_on != checkpoint_md5:
        raise PipelineError(f"{folder}: fitted on checkpoint md5 {fitted_on}, but {checkpoint} now has md5 "
                            f"{checkpoint_md5}; rerun with --force to refit")
    print(f"[{ctx.name}] {folder}: already fitted on {checkpoint} (md5 {checkpoint_md5}); skipping")
    ctx.summary({"skipped": True, "prior_precision": meta.get("prior_precision")})
    return True


def load_head_posterior(cfg, run_id: str, device) -> tuple[torch.nn.Module, lp.LastLayerPosterior]:
    """The frozen MAP head of ``run_id`` and its fitted Laplace posterior (for later stages)."""
    head, checkpoint = load_trained_head(cfg, run_id, device)
    folder = laplace_run_dir(cfg.project_root, "head", run_id)
    meta = lp.read_posterior_meta(folder)
    if meta.source_checkpoint_md5 != cached_file_md5(checkpoint):
        raise PipelineError(f"{folder}: fitted on another checkpoint than {checkpoint}; rerun fit_laplace.py --force")
    return head, lp.load_posterior(folder, head, device)


@torch.no_grad()
def quality_checks(head, posterior, val_samples: HeadSamples, num_samples: int, seed: int,
                   nll_eps: float, batch_size: int = 8) -> dict:
    """MAP vs Laplace NLL/ECE and the mutual-information margin on MAP errors (validation split)."""
    quality = lp.PosteriorQualityAccumulator(nll_eps)
    for batch_index, (inputs, targets) in enumerate(lp.iterate_in_batches(val_samples, batch_size)):
        x = inputs.x if isinstance(inputs, lp.HeadInputs) else inputs
        embedding = inputs.image_embedding if isinstance(inputs, lp.HeadInputs) else None
        device = posterior.device
        x, targets = x.to(device), targets.to(device)
        embedding = None if embedding is None else embedding.to(device)
        map_prob = torch.sigmoid(head(x, embedding))[:, 0]
        head_inputs = x if embedding is None else lp.HeadInputs(x, embedding)
        maps = posterior.uncertainty_maps(head_inputs, num_samples, seed=seed + batch_index)
        quality.update(map_prob, maps, targets)
    return quality.compute()


def tune_temperature_and_prior(la, head, val_samples: HeadSamples, settings, batch_size: int):
    """Grid-search (temperature, prior precision) on the validation NLL of the probit predictive.

    Sets the best pair on ``la`` and returns ``(temperature, prior search at that temperature,
    table of every pair's NLL)``. Ties go to the first (lowest) temperature.
    """
    best = None
    rows = []
    for temperature in settings.temperature_grid:
        la.temperature = float(temperature)
        search = lp.tune_head_prior_precision(la, head, lp.iterate_in_batches(val_samples, batch_size),
                                              grid=settings.prior_precision_grid, nll_eps=settings.nll_eps)
        rows += [{"temperature": float(temperature), "prior_precision": p, "val_nll": nll}
                 for p, nll in zip(search.grid, search.nll)]
        if best is None or min(search.nll) < min(best[1].nll):
            best = (float(temperature), search)
    temperature, search = best
    la.temperature = temperature
    la.prior_precision = search.best_prior_precision
    return temperature, search, pd.DataFrame(rows)


def run_stage(ctx, run_id: str) -> None:
    cfg = ctx.cfg
    settings = cfg.laplace
    if settings.target == "sam_decoder":
        from modules.laplace.decoder import run_decoder_stage

        return run_decoder_stage(ctx, run_id)
    if settings.target != "head":
        raise PipelineError(f"laplace.target: unknown target {settings.target!r}; use 'head' or 'sam_decoder'")
    device = resolve_device(cfg.training.device, key="training.device")
    head, checkpoint = load_trained_head(cfg, run_id, device)
    checkpoint_md5 = cached_file_md5(checkpoint)
    folder = ctx.output_dir
    if already_fitted(ctx, checkpoint, checkpoint_md5):
        return
    ctx.check_inputs(["laplace"], {"head_checkpoint_md5": checkpoint_md5})

    train_set, val_set = (HeadSamples(d) for d in packed_datasets(cfg))
    print(f"[{ctx.name}] fitting a diagonal last-layer Laplace ({settings.backend}) on "
          f"{len(train_set)} training rows of {checkpoint}")
    with torch.autocast(device_type=device.type, enabled=False):
        la = lp.fit_head_laplace(head, train_set, backend=settings.backend)
        temperature, search, grid_table = tune_temperature_and_prior(la, head, val_set, settings,
                                                                     cfg.training.batch_size)
    for step, row in grid_table.iterrows():
        ctx.tracker.log(row.to_dict(), step=int(step))
    meta = lp.PosteriorMeta.for_head(la, settings.backend, search, checkpoint_md5)
    meta.tuning_nll = grid_table.to_dict("records")
    lp.save_posterior(folder, la, meta, cfg.section("laplace"))
    atomic_write_csv(folder / "prior_precision_nll.csv", grid_table)

    from modules.scoring.plots import plot_prior_grid

    plot_prior_grid(list(search.grid), list(search.nll), search.best_prior_precision,
                    folder / "prior_precision_nll.png", title=f"Laplace prior precision (temperature {temperature:g})")
    posterior = lp.LastLayerPosterior.from_laplace(head, la)
    checks = quality_checks(head, posterior, val_set, settings.num_samples, settings.seed, settings.nll_eps)
    atomic_write_json(folder / "quality.json", checks)
    ctx.tracker.log_table("prior_precision_nll", grid_table)
    ctx.tracker.log_artifact(folder, name=f"laplace-head-run_{run_id}", type="laplace")
    ctx.summary({"prior_precision": search.best_prior_precision, "temperature": temperature,
                 "n_data_pixels": int(la.n_data), **checks})
