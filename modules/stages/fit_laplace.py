"""Stage 6: fit the last-layer Laplace posterior, tune its prior, save it, and check it is worth having.

``laplace.target`` picks the layer: the head's final conv (``laplace.head``) or SAM's mask-decoder
hypernetwork (``laplace.decoder``). Artifacts in ``laplace/<target>/run_<id>/``: ``laplace_state.pt``,
``laplace_config.yaml``, ``posterior_meta.json``, ``prior_precision_nll.csv`` and
``prior_precision_nll.png``, and, written last, ``quality.json`` (the checks below). The fit is skipped
when all of them exist (a fit killed before ``quality.json`` is fitted again) and the stage fingerprint
(``.stage.json``: every ``laplace.*`` value and the checkpoint md5) is unchanged; the fingerprint is
checked before that skip, so a changed setting or checkpoint is a one-line error until ``--force`` refits.

Temperature and prior precision (head target): the temperature with the lowest validation NLL, the
prior precision at each temperature by ``laplace.prior_selection`` (the Laplace marginal likelihood, or
the validation NLL), on the grids widened by ``laplace.grid_widening`` decades
(``posterior.search_inside_grids``); ``quality.json`` records both and whether each lies strictly
inside its searched grid (a warning is logged when not). Quality checks on the
validation split (printed and logged): NLL and ECE of the Laplace predictive
(probit) against the MAP head, and the mean mutual information on pixels the MAP head gets wrong
against those it gets right.
"""

from __future__ import annotations

import logging

import pandas as pd
import torch

from modules.cache.packed_reader import packed_dataset
from modules.core.errors import PipelineError
from modules.core.device import resolve_device
from modules.core.fileio import atomic_write_csv, atomic_write_json, cached_file_md5
from modules.laplace import decoder_fit
from modules.laplace import head as lh
from modules.laplace import posterior as lp
from modules.laplace.decoder import TARGET as DECODER_TARGET
from modules.laplace.decoder import DecoderLaplaceError, DecoderPosterior, save_decoder_posterior
from modules.sam.base import BackboneError
from modules.sam.registry import configured_checkpoint_md5, load_configured_backbone
from modules.scoring.plots import plot_prior_grid
from modules.training.checkpoints import load_trained_head

log = logging.getLogger("pipeline")


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


def tune_temperature_and_prior(la, head, val_samples: HeadSamples, settings, batch_size: int) -> lp.TwoGridSearch:
    """Choose the temperature on the validation NLL of the probit predictive and the prior precision by
    ``laplace.prior_selection`` (the marginal likelihood, or the validation NLL), the grids widened until
    both lie inside (``posterior.search_inside_grids``); sets them on ``la``."""

    def search_at(temperature: float, priors: tuple[float, ...]):
        la.temperature = float(temperature)
        return lh.tune_head_prior_precision(la, head, lh.iterate_in_batches(val_samples, batch_size),
                                            grid=priors, nll_eps=settings.nll_eps)

    def evidence_at(temperature: float, priors: tuple[float, ...]):
        return lh.head_prior_log_evidence(la, head, temperature, priors)

    by_evidence = lp.check_prior_selection(settings.prior_selection) == "marglik"
    outcome = lp.search_inside_grids(search_at, settings.temperature_grid, settings.prior_precision_grid,
                                     max_widenings=settings.grid_widening,
                                     evidence_at=evidence_at if by_evidence else None)
    la.temperature = outcome.temperature
    la.prior_precision = outcome.search.best_prior_precision
    return outcome


def run_stage(ctx, run_id: str) -> None:
    """Stage 6 for the configured ``laplace.target``; ``run_id`` names the head run (and the output run)."""
    cfg = ctx.cfg
    settings = cfg.laplace
    if settings.target == DECODER_TARGET:
        return run_decoder_stage(ctx, run_id)
    if settings.target != "head":
        raise PipelineError(f"laplace.target: unknown target {settings.target!r}; use 'head' or 'sam_decoder'")
    lh.check_target_layer(settings.target_layer)
    device = resolve_device(cfg.training.device, key="training.device")
    head, checkpoint = load_trained_head(cfg, run_id, device)
    checkpoint_md5 = cached_file_md5(checkpoint)
    folder = ctx.output_dir
    if lp.already_fitted(ctx, checkpoint, checkpoint_md5, {"head_checkpoint_md5": checkpoint_md5}):
        return

    train_set, val_set = (HeadSamples(packed_dataset(cfg, split)) for split in ("train", "val"))
    log.info(f"[{ctx.name}] fitting a diagonal last-layer Laplace ({settings.backend}) on "
          f"{len(train_set)} training rows of {checkpoint}")
    with torch.autocast(device_type=device.type, enabled=False):
        la = lh.fit_head_laplace(head, train_set, backend=settings.backend)
        tuning = tune_temperature_and_prior(la, head, val_set, settings, cfg.training.batch_size)
    temperature, search, grid_table = tuning.temperature, tuning.search, pd.DataFrame(tuning.table)
    for step, row in grid_table.iterrows():
        ctx.tracker.log(row.to_dict(), step=int(step))
    meta = lp.PosteriorMeta.for_head(la, settings.backend, search, checkpoint_md5)
    meta.tuning_nll = grid_table.to_dict("records")
    lh.save_posterior(folder, la, meta, cfg.section("laplace"))
    atomic_write_csv(folder / lp.GRID_TABLE_FILE, grid_table)
    plot_prior_grid(list(search.grid), list(search.nll), search.best_prior_precision,
                    folder / lp.GRID_PLOT_FILE,
                    title=f"Laplace prior precision by {tuning.prior_selection} (temperature {temperature:g})")
    posterior = lh.LastLayerPosterior.from_laplace(head, la)
    checks = lh.head_quality_checks(head, posterior, val_set, settings.num_samples, settings.seed, settings.nll_eps,
                                    predictive=settings.predictive)
    checks["searched_temperature_grid"] = list(tuning.temperature_grid)
    checks["searched_prior_precision_grid"] = list(tuning.prior_precision_grid)
    checks["prior_selection"] = tuning.prior_selection
    checks["temperature"], checks["prior_precision"] = temperature, search.best_prior_precision
    checks["temperature_interior"] = tuning.temperature_interior
    checks["prior_precision_interior"] = tuning.prior_precision_interior
    checks["best_on_grid_edge"] = tuning.on_edge
    atomic_write_json(folder / lp.QUALITY_FILE, checks)
    ctx.tracker.log_table("prior_precision_nll", grid_table)
    ctx.tracker.log_artifact(folder, name=f"laplace-head-run_{run_id}", type="laplace")
    ctx.summary({"n_data_pixels": int(la.n_data), **checks})


def run_decoder_stage(ctx, run_id: str) -> None:
    """Stage 6 for ``laplace.target: sam_decoder``; ``run_id`` names the run."""
    cfg = ctx.cfg
    settings = cfg.laplace
    checkpoint_md5 = configured_checkpoint_md5(cfg.sam.checkpoint)
    folder = ctx.output_dir
    sam = cfg.sam
    upstream = {"sam_checkpoint_md5": checkpoint_md5, "sam_family": sam.family, "sam_model_type": sam.model_type,
                "prompt_mode": sam.prompt_mode, "multimask_policy": sam.multimask_policy}
    if lp.already_fitted(ctx, cfg.sam.checkpoint, checkpoint_md5, upstream):
        return
    try:
        backbone = load_configured_backbone(sam)
    except BackboneError as error:
        raise DecoderLaplaceError(str(error)) from None

    train_rows = decoder_fit.SplitRows(cfg, "train", backbone)
    val_rows = decoder_fit.SplitRows(cfg, "val", backbone, cache=train_rows.cache)
    # Two passes over the validation split (grid search, quality checks): decode it once if it fits.
    fits_in_memory = val_rows.num_rows * decoder_fit.ROW_BYTES <= decoder_fit.VALIDATION_IN_MEMORY_BYTES
    validation = list(val_rows) if fits_in_memory else val_rows
    log.info(f"[{ctx.name}] fitting a diagonal Laplace on the {sam.family}/{sam.model_type} decoder's hypernetwork "
          f"last layers over {train_rows.num_rows} training rows ({len(train_rows)} images) of {sam.checkpoint}")
    with torch.autocast(device_type=backbone.device.type, enabled=False):
        accumulator = decoder_fit.accumulate_curvature(train_rows)
        unused = [token for token, entry in accumulator.curvature.items() if entry.n_prompts == 0]
        if unused:
            log.info(f"[{ctx.name}] mask tokens {unused} were never chosen on the training split: their posterior "
                  "is the prior")
        search = decoder_fit.search_temperature_and_prior(accumulator.means, accumulator.curvature, validation,
                                                          settings.prior_precision_grid, settings.temperature_grid,
                                                          settings.nll_eps)
        posterior = DecoderPosterior.from_curvature(accumulator.means, accumulator.curvature,
                                                    search.prior_search.best_prior_precision, search.temperature)
    for step, row in search.table.iterrows():
        ctx.tracker.log(row.to_dict(), step=int(step))
    meta = decoder_fit.posterior_meta(posterior, accumulator, search, checkpoint_md5, sam)
    save_decoder_posterior(folder, posterior, accumulator, meta, cfg.section("laplace"))
    atomic_write_csv(folder / lp.GRID_TABLE_FILE, search.table)
    plot_prior_grid(list(search.prior_search.grid), list(search.prior_search.nll),
                    search.prior_search.best_prior_precision, folder / lp.GRID_PLOT_FILE,
                    title=f"SAM decoder Laplace prior precision (temperature {search.temperature:g})")
    with torch.autocast(device_type=backbone.device.type, enabled=False):
        checks = decoder_fit.decoder_quality_checks(posterior, validation, settings.num_samples, settings.seed,
                                                    settings.nll_eps, predictive=settings.predictive)
    atomic_write_json(folder / lp.QUALITY_FILE, checks)
    ctx.tracker.log_table("prior_precision_nll", search.table)
    ctx.tracker.log_artifact(folder, name=f"laplace-{DECODER_TARGET}-run_{run_id}", type="laplace")
    ctx.summary({"prior_precision": posterior.prior_precision, "temperature": posterior.temperature,
                 "num_parameters": posterior.num_weights, "n_data_pixels": accumulator.n_pixels,
                 "tokens_without_data": unused, **checks})
