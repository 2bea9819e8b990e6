import subprocess
import sys
from pathlib import Path

import pandas as pd

from modules.core.config import load_config
from modules.core.tracking import NullTracker, start_tracker
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
