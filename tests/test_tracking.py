import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pandas as pd

from modules.core.config import load_config
from modules.core.lineage import (declare_stage_inputs, evaluation_model_inputs, laplace_artifact,
                                  log_stage_output, model_artifact)
from modules.core.tracking import NullTracker, WandbTracker, default_group, start_tracker
from modules.evaluation.methods import needed_artifacts
from tests.wandb_records import offline_runs, read_offline_run

REPO = Path(__file__).resolve().parents[1]


def test_offline_run_records_metrics_inside_the_project_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, ["wandb.enabled=true", "wandb.mode=offline", "wandb.group=g1"])
    project = tmp_path / "proj"
    tracker = start_tracker(cfg.wandb, "build_manifests", project, {"x": 1})
    tracker.log({"valid": 7, "invalid": 2})
    tracker.log_table("per_group", pd.DataFrame({"group": ["a", "b"], "n": [3, 4]}))
    tracker.summary({"valid_total": 7})
    tracker.finish()
    (run_dir,) = offline_runs(project)
    run = read_offline_run(run_dir)
    assert run["job_type"] == "build_manifests" and run["group"] == "g1"
    assert {"valid": 7, "invalid": 2}.items() <= {k: v for h in run["history"] for k, v in h.items()}.items()
    assert run["summary"]["valid_total"] == 7
    assert not (tmp_path / "home").exists()  # nothing written to ~/.cache or ~/.config


def test_disabled_tracking_is_a_stub_and_never_imports_wandb(tmp_path):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from modules.core.config import load_config\n"
        "from modules.core.tracking import start_tracker\n"
        "cfg = load_config(None, ['wandb.enabled=false'])\n"
        f"t = start_tracker(cfg.wandb, 's', Path({str(tmp_path)!r}) / 'p', {{}})\n"
        "t.log({'a': 1}); t.summary({'b': 2}); t.finish()\n"
        "print(type(t).__name__, 'wandb' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["NullTracker", "False"], out.stderr
    assert not (tmp_path / "p").exists()
    assert isinstance(start_tracker(load_config(None, ["wandb.mode=disabled", "wandb.enabled=true"]).wandb,
                                    "s", tmp_path, {}), NullTracker)


def test_default_group_is_one_per_project_root(tmp_path):
    first, second = tmp_path / "a" / "demo", tmp_path / "b" / "demo"  # same folder name, two projects
    assert default_group(first) != default_group(second)
    assert default_group(first) == default_group(tmp_path / "a" / "x" / ".." / "demo")  # one root, one group
    assert default_group(first).startswith("pipeline-demo-")


def test_stages_log_their_outputs_and_declare_their_inputs(tmp_path, monkeypatch):
    """What ``stage_context`` does for stage 2 (``declare_stage_inputs`` when the run opens,
    ``log_stage_output`` when it ends), W&B offline and no group set: the output record is an artifact;
    offline runs cannot ``use_artifact`` (wandb refuses), so the input is listed in the run's config."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    project = tmp_path / "project"
    output = project / "prompt_sets"
    output.mkdir(parents=True)
    (output / ".stage.json").write_text("{}")
    (output / "config.resolved.yaml").write_text("a: 1\n")
    (output / "train").mkdir()  # the data itself is not part of the record
    (output / "train" / "s1.json").write_text("{}")
    cfg = load_config(None, ["wandb.enabled=true", "wandb.mode=offline"])
    tracker = start_tracker(cfg.wandb, "generate_promptsets", project, {})
    declare_stage_inputs(tracker, "generate_promptsets", Namespace(), cfg)
    log_stage_output(tracker, "generate_promptsets", output)
    tracker.finish()
    (run_dir,) = offline_runs(project)
    run = read_offline_run(run_dir)
    assert run["group"] == default_group(project)
    assert run["artifacts"] == [{"name": "promptsets", "type": "promptsets",
                                 "files": [".stage.json", "config.resolved.yaml"]}]
    assert run["config"]["lineage/inputs"] == ["manifests:latest"]


class RecordingRun:
    """The calls an online wandb run receives (no server here)."""

    offline = False
    dir = None

    def __init__(self):
        self.used = []

    def use_artifact(self, name, type):
        self.used.append((name, type))


def test_online_runs_declare_every_input_of_the_evaluation():
    cfg = load_config(None, ["laplace.target=sam_decoder"])
    run = RecordingRun()
    tracker = WandbTracker(run, wandb_module=None)
    args = Namespace(run_id="v2", head_run_id=None, variance_run_id="v3", laplace_run_id=None, fusion_run_id=None)
    declare_stage_inputs(tracker, "evaluate_uncertainty", args, cfg)
    needed = sorted(needed_artifacts(cfg))
    for name, kind in evaluation_model_inputs(needed, {"head": "v2", "variance": "v3", "laplace": "v2",
                                                       "fusion": "v2"}, cfg.laplace.target):
        tracker.use_artifact(name, kind)
    names = [name for name, _ in run.used]
    assert names[:2] == ["promptsets:latest", "sam_cache:latest"]
    expected = {"head": "head-run_v2:latest", "variance": "variance-run_v3:latest", "fusion": "fusion-run_v2:latest",
                "laplace": "laplace-sam_decoder-run_v2:latest", "head_laplace": "laplace-head-run_v2:latest"}
    assert sorted(names[2:]) == sorted(expected[name] for name in needed if name in expected)
    assert {"head", "laplace", "fusion"} <= set(needed)  # the default config evaluates them
    # the model artifacts are the names the training and Laplace stages log
    assert model_artifact("head", "v2")[0] == "head-run_v2" and laplace_artifact("head", "v2")[0] == "laplace-head-run_v2"
