import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modules.core.config import ConfigError, load_config, require_existing

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path, body: dict) -> Path:
    path = tmp_path / "cfg" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body))
    return path


def test_repository_config_loads_with_typed_sections():
    cfg = load_config(REPO / "config.yaml")
    assert cfg.training.lr == pytest.approx(5e-3)  # the demo's CPU-sized schedule (code default 1e-3)
    assert isinstance(cfg.training.batch_size, int)
    assert cfg.sam.model_type == "demo_tiny"
    assert cfg.data.project_root == (REPO / "runs" / "demo").resolve()


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    path = write_config(tmp_path, {"data": {"images_root": "imgs", "masks_root": "../masks", "project_root": "out"}})
    cfg = load_config(path)
    assert cfg.data.images_root == (tmp_path / "cfg" / "imgs").resolve()
    assert cfg.data.masks_root == (tmp_path / "masks").resolve()
    assert cfg.data.project_root == (tmp_path / "cfg" / "out").resolve()


def test_dotted_overrides_are_typed(tmp_path):
    path = write_config(tmp_path, {"training": {"lr": "1e-3"}})
    cfg = load_config(path, ["training.lr=3e-4", "training.num_epochs=2", "wandb.enabled=false",
                             "laplace.prior_precision_grid=[0.1, 1]"])
    assert cfg.training.lr == pytest.approx(3e-4)
    assert cfg.training.num_epochs == 2
    assert cfg.wandb.enabled is False
    assert cfg.laplace.prior_precision_grid == [0.1, 1.0]


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.lr=fast", "training.lr"),
        ("training.batch_size=2.5", "training.batch_size"),
        ("training.bogus=1", "training.bogus"),
        ("bogus.x=1", "bogus"),
        ("sam.device=gpu", "sam.device"),
        ("wandb.enabled=maybe", "wandb.enabled"),
        ("prompt_generation.min_pairs=0", "prompt_generation.min_pairs"),
        ("data.split_fractions=[0.5, 0.6, 0.1]", "data.split_fractions"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, key):
    path = write_config(tmp_path, {})
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    message = str(info.value)
    assert message.startswith(key), message
    assert "\n" not in message


def test_missing_required_path_names_the_key(tmp_path):
    cfg = load_config(write_config(tmp_path, {"data": {"images_root": "nowhere"}}))
    with pytest.raises(ConfigError, match=r"^data\.images_root: folder does not exist"):
        require_existing(cfg, "data.images_root")


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)


def test_script_reports_config_errors_as_one_line(tmp_path):
    path = write_config(tmp_path, {"data": {"project_root": str(tmp_path / "proj")}, "wandb": {"enabled": False}})
    result = subprocess.run(
        [sys.executable, str(REPO / "generate_promptsets.py"), "--config", str(path), "--set", "training.lr=abc"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: training.lr: expected a number, got 'abc'"]
