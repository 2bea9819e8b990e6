"""Stale results are never reused silently: every artifact's fingerprint covers every input that
shaped it, and it is checked before any "already done" skip.

- Stage 6: a changed ``laplace.*`` value stops ``fit_laplace.py`` although the posterior is fitted.
- Stage 5: the variance network and the fusion module record the md5s of the files they train on
  (head, head Laplace state, variance network, SAM checkpoint), so a refit upstream stops them.
- Stage 7: the evaluation fingerprints the fusion module and the Laplace state it reads.
- Where the data and the project lie is no input: moved elsewhere, stages 1-4.5 redo nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from modules.core.config import load_config
from modules.core.fileio import atomic_write_json
from modules.core.paths import manifest_path
from modules.core.stage import StageContext, StageInputsChanged
from modules.evaluation.methods import needed_artifacts
from modules.evaluation.runs import RunIds
from modules.laplace import posterior as lp
from modules.stages.evaluate_uncertainty import stage_upstream
from modules.stages.train_head import fingerprint_sections, trained_on_artifacts
from tests.conftest import DEMO_CHECKPOINT, PREPARE_STAGES, PipelineProject, prepared_demo_project, small_demo_config
from tests.helpers.stage_calls import file_hashes


def make_ctx(tmp_path, overrides=(), force=False):
    cfg = load_config(None, [f"data.project_root={tmp_path / 'proj'}", *overrides])
    out = tmp_path / "proj" / "laplace" / "head" / "run_x"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(name="fit_laplace", cfg=cfg, args=argparse.Namespace(force=force), output_dir=out)


def write_fitted_posterior(folder, checkpoint_md5="abc"):
    for name in lp.ARTIFACTS:
        (folder / name).write_text("x")
    atomic_write_json(folder / lp.META_FILE, {"source_checkpoint_md5": checkpoint_md5, "prior_precision": 1.0})


# --------------------------------------------------------------------------- unit level


def test_fingerprint_is_checked_before_the_already_fitted_skip(tmp_path):
    upstream = {"head_checkpoint_md5": "abc"}
    ctx = make_ctx(tmp_path)
    assert lp.already_fitted(ctx, "best.pt", "abc", upstream) is False  # first fit
    write_fitted_posterior(ctx.output_dir)
    assert lp.already_fitted(make_ctx(tmp_path), "best.pt", "abc", upstream) is True  # unchanged: skipped
    fingerprint = json.loads((ctx.output_dir / ".stage.json").read_text())
    assert set(fingerprint) == {"stage", "config", "upstream"} and set(fingerprint["config"]) == {"laplace"}
    assert fingerprint["upstream"] == upstream

    changed = make_ctx(tmp_path, ["laplace.prior_precision_grid=[0.5, 5.0]"])
    with pytest.raises(StageInputsChanged, match=r"laplace\.prior_precision_grid.*--force"):
        lp.already_fitted(changed, "best.pt", "abc", upstream)
    with pytest.raises(StageInputsChanged, match=r"upstream head_checkpoint_md5"):
        lp.already_fitted(make_ctx(tmp_path), "best.pt", "other", {"head_checkpoint_md5": "other"})

    # --force refits: the old posterior is gone before the fit starts, so a refit killed half-way
    # cannot leave it looking complete under the new fingerprint.
    forced = make_ctx(tmp_path, ["laplace.prior_precision_grid=[0.5, 5.0]"], force=True)
    assert lp.already_fitted(forced, "best.pt", "abc", upstream) is False
    assert not any((ctx.output_dir / name).exists() for name in lp.ARTIFACTS)
    write_fitted_posterior(ctx.output_dir)
    assert lp.already_fitted(make_ctx(tmp_path, ["laplace.prior_precision_grid=[0.5, 5.0]"]), "best.pt", "abc",
                             upstream) is True


def test_trained_models_fingerprint_the_artifacts_they_train_on(tmp_path):
    def names(model, source="laplace_epistemic"):
        cfg = load_config(None, [f"data.project_root={tmp_path}", f"fusion.uncertainty_source={source}"])
        return trained_on_artifacts(cfg, model)

    assert names("head") == set()
    assert names("variance") == {"head"}
    assert names("fusion") == {"sam_checkpoint", "head", "head_laplace"}
    assert names("fusion", "variance_network") == {"sam_checkpoint", "head", "variance"}
    assert names("fusion", "map_entropy") == {"sam_checkpoint", "head"}
    assert names("fusion", "constant") == {"sam_checkpoint"}
    # The settings that shape the fused map are fingerprinted with it (the head's are unchanged).
    cfg = load_config(None, [f"data.project_root={tmp_path}", "fusion.uncertainty_source=laplace_epistemic"])
    assert fingerprint_sections(cfg, "head") == ["head", "training"]
    assert fingerprint_sections(cfg, "variance") == ["head", "training", "variance"]
    fusion_sections = set(fingerprint_sections(cfg, "fusion"))
    assert {"laplace.num_samples", "laplace.seed", "fusion", "sam.multimask_policy"} <= fusion_sections
    assert {name: cfg.section(name) for name in fingerprint_sections(cfg, "fusion")}["laplace.seed"] == cfg.laplace.seed

    # What SAM outputs counts; how fast it runs does not (a changed worker count once stopped fusion).
    def fusion_fingerprint(*overrides):
        cfg = load_config(None, [f"data.project_root={tmp_path}", *overrides])
        return {name: cfg.section(name) for name in fingerprint_sections(cfg, "fusion")}

    default = fusion_fingerprint()
    for speed_only in ("sam.num_workers=7", "sam.device=cpu", "sam.decoder_batch=3", "sam.cache_writer=thread",
                       "sam.encoder_batch_size=2", "sam.encoder_impl=fast", "sam.compile_encoder=false"):
        assert fusion_fingerprint(speed_only) == default, speed_only
    assert fusion_fingerprint("sam.multimask_policy=single") != default


def test_evaluation_fingerprints_the_fusion_module_and_its_laplace_state(tmp_path):
    cfg = load_config(None, [f"data.project_root={tmp_path}", "evaluation.refinement=true",
                             "fusion.uncertainty_source=laplace_epistemic"])
    assert {"fusion", "head", "head_laplace", "laplace", "variance", "sam_checkpoint"} <= needed_artifacts(cfg)
    cfg = load_config(None, [f"data.project_root={tmp_path}", "evaluation.refinement=true",
                             "evaluation.strategies=[raw_sam]", "fusion.uncertainty_source=variance_network"])
    assert {"fusion", "head", "variance"} <= needed_artifacts(cfg)


def test_int8_encoder_weights_are_an_input_of_the_evaluation_only_when_on(tmp_path):
    """TTA encodes its augmented images at evaluation time, with the configured encoder weights."""
    manifest = manifest_path(tmp_path, "test")
    manifest.parent.mkdir(parents=True)
    manifest.write_text("safe_id\n")
    settings = [f"data.project_root={tmp_path}", f"sam.checkpoint={DEMO_CHECKPOINT}", "evaluation.strategies=[tta]",
                "evaluation.refinement=false", "evaluation.active_prompting.enabled=false"]
    float_weights = stage_upstream(load_config(None, settings), RunIds.resolve("v1"))
    int8_weights = stage_upstream(load_config(None, [*settings, "sam.encoder_int8=true"]), RunIds.resolve("v1"))
    assert "sam.encoder_int8" not in float_weights  # fingerprints from before the key still match
    assert int8_weights == {**float_weights, "sam.encoder_int8": True}


# --------------------------------------------------------------------------- real scripts


def one_line_error(result, *names):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # not library warnings
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--force" in lines[0] and all(name in lines[0] for name in names), lines[0]


#: Quick training: these tests are about what stops a rerun, not about the models.
QUICK = {"training.num_epochs": 1, "fusion.num_epochs": 1, "fusion.max_train_rows": 4}


@pytest.fixture(scope="module")
def moved_project(tmp_path_factory) -> PipelineProject:
    """A small demo project made through stages 1-4.5, then moved with its data to another folder,
    as a cluster job copies both to a node's local disk: only the roots in its config change."""
    made = tmp_path_factory.mktemp("made")
    prepared_demo_project(made, QUICK)
    moved = tmp_path_factory.mktemp("moved")
    for name in ("data", "project"):
        shutil.move(made / name, moved / name)
    return PipelineProject(moved, small_demo_config(moved, QUICK))


def test_a_moved_project_and_data_folder_keep_every_output(moved_project):
    """The data's and the project's location is no input: stages 1-4.5 rerun on the moved folders,
    redo nothing (stage 3 encodes no image) and leave every output byte for byte as it was."""
    # invalid_samples.csv, a report for people, keeps absolute paths: it and its md5 may change.
    report = ("manifests/invalid_samples.csv", "manifests/checksums.json")

    def outputs() -> dict[str, str]:
        return {name: md5 for name, md5 in file_hashes(moved_project.root).items()
                if not name.endswith("config.resolved.yaml") and not name.startswith((".locks", ".cache", *report))}

    before = outputs()
    assert {"manifests/train.csv", "training_data/train_index.csv", "training_data/train.h5"} <= set(before)
    assert {"prompt_sets", "sam_cache"} <= {name.split("/")[0] for name in before}
    logs = [moved_project.run(script).stdout for script in PREPARE_STAGES]
    assert "done: 0" in logs[1] and "done: 0" in logs[2], logs[1:3]
    assert outputs() == before


def test_changed_inputs_stop_laplace_fusion_and_variance_until_force(moved_project):
    project = moved_project
    project.run("train_head.py", "--model", "head", "--run_id", "s")

    # Stage 6: fitted once, skipped when unchanged.
    project.run("fit_laplace.py", "--run_id", "s")
    assert "skipping" in project.run("fit_laplace.py", "--run_id", "s").stdout

    # Fusion on the head's Laplace: a finished run with unchanged inputs is left as it is ...
    fusion = ("train_head.py", "--model", "fusion", "--run_id", "s")
    project.run(*fusion)
    best = project.root / "checkpoints" / "fusion" / "run_s" / "best.pt"
    trained = best.read_bytes()
    project.run(*fusion, "--resume-if-exists")
    assert best.read_bytes() == trained

    # A changed laplace.* value stops fit_laplace.py until --force refits ...
    grid = "laplace.prior_precision_grid=[0.5, 5.0]"
    one_line_error(project.run("fit_laplace.py", "--run_id", "s", "--set", grid, check=False),
                   "laplace.prior_precision_grid")
    laplace_dir = project.root / "laplace" / "head" / "run_s"
    old_state = (laplace_dir / "laplace_state.pt").read_bytes()
    refit = project.run("fit_laplace.py", "--run_id", "s", "--set", grid, "--force")
    assert "skipping" not in refit.stdout
    searched = json.loads((laplace_dir / "posterior_meta.json").read_text())["prior_precision_grid"]
    assert searched == [0.5, 5.0]  # laplace.grid_widening is 0
    assert (laplace_dir / "laplace_state.pt").read_bytes() != old_state
    # ... and the refitted Laplace (the map fusion trained on) stops the fusion rerun.
    one_line_error(project.run(*fusion, "--resume-if-exists", check=False), "upstream artifact_md5s.head_laplace")

    # The variance network trains on the frozen head: a retrained head stops its rerun.
    variance = ("train_head.py", "--model", "variance", "--run_id", "s")
    project.run(*variance)
    project.run(*variance, "--resume-if-exists")
    project.run("train_head.py", "--model", "head", "--run_id", "s", "--set", "training.seed=7", "--force")
    one_line_error(project.run(*variance, "--resume-if-exists", check=False), "upstream artifact_md5s.head")
