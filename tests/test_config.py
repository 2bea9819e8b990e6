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
        ("data.project_root=/", "data.project_root"),  # e.g. $VAR/ with VAR unset
        ("data.project_root=" + "../" * 64, "data.project_root"),  # the root, reached from the config's folder
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


# --------------------------------------------------------------------------- numeric ranges


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.lr=-1e-3", "training.lr"),
        ("training.lr=0", "training.lr"),
        ("training.lr=.nan", "training.lr"),
        ("training.weight_decay=-0.1", "training.weight_decay"),
        ("training.logit_clip=.inf", "training.logit_clip"),
        ("training.num_workers=-1", "training.num_workers"),
        ("training.dice_lambda=-.inf", "training.dice_lambda"),
        ("sam.encoder_batch_size=0", "sam.encoder_batch_size"),
        ("head.hidden_channels=0", "head.hidden_channels"),
        ("data.mask_threshold=300", "data.mask_threshold"),
        ("data.min_image_side=-5", "data.min_image_side"),
        ("data.split_fractions=[.nan, 0.5, 0.5]", "data.split_fractions[0]"),
        ("data.split_fractions=[1.5, -0.25, -0.25]", "data.split_fractions[0]"),
        ("prompt_generation.gaussian_sigma=.nan", "prompt_generation.gaussian_sigma"),
        ("prompt_generation.box_jitter=-0.5", "prompt_generation.box_jitter"),
        ("demo.scenes_per_group=0", "demo.scenes_per_group"),
        ("variance.mc_samples=0", "variance.mc_samples"),
        ("variance.log_var_min=.nan", "variance.log_var_min"),
        ("variance.log_var_min=6", "variance.log_var_min"),
        ("laplace.prior_precision_grid=[1.0, -1.0]", "laplace.prior_precision_grid[1]"),
        ("laplace.temperature_grid=[1.0, .inf]", "laplace.temperature_grid[1]"),
        ("laplace.num_samples=0", "laplace.num_samples"),
        ("laplace.nll_eps=0", "laplace.nll_eps"),
        ("fusion.lr=-1", "fusion.lr"),
        ("fusion.max_train_rows=-1", "fusion.max_train_rows"),
        ("evaluation.ece_bins=0", "evaluation.ece_bins"),
        ("evaluation.max_samples=-3", "evaluation.max_samples"),
        ("evaluation.tta.magnitudes.hue=-0.1", "evaluation.tta.magnitudes.hue"),
        ("evaluation.prompt_perturbation.point_noise_px=-2", "evaluation.prompt_perturbation.point_noise_px"),
        ("evaluation.prompt_perturbation.reference_side=0", "evaluation.prompt_perturbation.reference_side"),
        ("wandb.init_timeout_s=-1", "wandb.init_timeout_s"),
        ("training.seed=-1", "training.seed"),
    ],
)
def test_out_of_range_numbers_name_the_key_and_value(tmp_path, override, key):
    path = write_config(tmp_path, {})
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    message = str(info.value)
    assert message.startswith(f"{key}:"), message
    assert "\n" not in message
    assert "got" in message, message


def test_every_numeric_key_has_a_range():
    from modules.core.config import NUMERIC_RANGES, numeric_keys

    assert sorted(numeric_keys()) == sorted(NUMERIC_RANGES)


def test_non_mapping_top_level_names_the_file(tmp_path):
    for text in ("- data\n- training\n", "42\n", "just a string\n"):
        path = tmp_path / "listy.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path, ["training.lr=1e-3"])
        message = str(info.value)
        assert message.startswith(str(path)) and "mapping" in message and "\n" not in message, message


def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("training:\n  lr: 0.001  # d\xe9j\xe0 vu\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "UTF-8" in message and "\n" not in message, message


def test_script_refuses_a_bad_number_before_writing_any_fingerprint(tmp_path):
    project = tmp_path / "proj"
    path = write_config(tmp_path, {"data": {"project_root": str(project)}, "wandb": {"enabled": False}})
    result = subprocess.run(
        [sys.executable, str(REPO / "generate_promptsets.py"), "--config", str(path),
         "--set", "prompt_generation.gaussian_sigma=-8"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: prompt_generation.gaussian_sigma: must be positive, got -8.0"]
    assert not list(project.rglob(".stage*.json")) if project.exists() else True
