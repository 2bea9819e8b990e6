"""Every id from the command line, the config or a data file name stays inside the project root, and
nothing outside it is ever deleted (``core.paths.check_name`` / ``ensure_inside``, ``core.fileio.remove_*``).

The script tests point the config at an empty project root: the refusal must come before any stage
work, so they need no trained model and run in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from modules.core import paths
from modules.core.errors import PipelineError
from modules.core.fileio import remove_file, remove_tree
from modules.core.paths import PathError, check_component, check_name, ensure_inside
from modules.data.manifest import make_safe_ids
from modules.evaluation.reports import QUALITATIVE_DIR, remove_reports
from tests.helpers.stage_calls import call_stage
from tests.stage_runner import run_stage, write_config

GOOD_NAMES = ["v1", "V", "0", "run-2024.01_a", "ablation.fusion", "x" * paths.NAME_MAX_CHARS]
BAD_NAMES = ["", ".", "..", ".hidden", "../x", "../../outside", "a/b", "a/", "/abs/x", "/../../x", "a..b", "-x",
             "_x", "a b", "a\nb", "a\\b", "é", "x" * (paths.NAME_MAX_CHARS + 1), None, 7]


# --------------------------------------------------------------------------- the validators


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_plain_names_are_accepted(name):
    assert check_name(name, "--run_id") == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_every_other_name_is_refused_in_one_line_naming_the_key(name):
    with pytest.raises(PathError) as info:
        check_name(name, "--run_id")
    assert isinstance(info.value, PipelineError)
    message = str(info.value)
    assert message.startswith("--run_id: ") and repr(name) in message and "\n" not in message


@pytest.mark.parametrize("value", ["sam2-hiera_b+-0123456789ab", "g__..", "_.__.._etc", "a..b"])
def test_single_components_are_accepted(value):
    assert check_component(value, "safe_id") == value


@pytest.mark.parametrize("value", ["", ".", "..", "a/b", "../x", "/abs", "a\\b", "a\0b", None])
def test_paths_are_not_components(value):
    with pytest.raises(PathError, match="^safe_id: "):
        check_component(value, "safe_id")


@pytest.mark.parametrize("build", [
    lambda root: paths.checkpoint_run_dir(root, "head", "../x"),
    lambda root: paths.checkpoint_run_dir(root, "../head", "v1"),
    lambda root: paths.checkpoint_run_relpath("head", "/abs"),
    lambda root: paths.laplace_run_dir(root, "head", ".."),
    lambda root: paths.laplace_run_relpath("../../x", "v1"),
    lambda root: paths.eval_report_dir(root, "../x"),
    lambda root: paths.eval_report_relpath("/tmp/x"),
    lambda root: paths.cache_dir(root, "../x"),
    lambda root: paths.promptset_path(root, "train", "../../x"),
    lambda root: paths.promptset_path(root, "..", "a"),
])
def test_path_builders_refuse_ids_that_climb_out(tmp_path, build):
    with pytest.raises(PathError):
        build(tmp_path)


def test_path_builders_accept_plain_ids(tmp_path):
    assert paths.checkpoint_run_dir(tmp_path, "head", "v1") == tmp_path / "checkpoints/head/run_v1"
    assert paths.laplace_run_relpath("sam_decoder", "dec") == "laplace/sam_decoder/run_dec"
    assert paths.eval_report_dir(tmp_path, "run_v1") == tmp_path / "reports/eval/run_v1"
    assert paths.cache_dir(tmp_path, "sam2-hiera_b+-0123") == tmp_path / "sam_cache/sam2-hiera_b+-0123"


# --------------------------------------------------------------------------- containment


@pytest.fixture
def layout(tmp_path):
    """``tmp_path/project`` (the root, with a folder ``inside``) and a sentinel folder beside it."""
    root = tmp_path / "project"
    (root / "inside").mkdir(parents=True)
    (root / "inside" / "keep.txt").write_text("keep")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("must survive")
    return root, outside


def test_ensure_inside_accepts_the_root_and_paths_under_it(layout):
    root, _ = layout
    assert ensure_inside(root, root) == root.resolve()
    assert ensure_inside(root, root / "inside") == (root / "inside").resolve()
    assert ensure_inside(root, root / "not" / "yet" / "made") == (root / "not/yet/made").resolve()
    assert ensure_inside(root, root / "inside" / ".." / "other") == (root / "other").resolve()


def test_ensure_inside_refuses_paths_outside(layout, tmp_path):
    root, outside = layout
    for path in (root / ".." / "outside", outside, Path("/"), root.parent, tmp_path / "project2" / "x",
                 root / "inside" / ".." / ".." / "outside"):
        with pytest.raises(PathError, match="^output folder: .* outside ") as info:
            ensure_inside(root, path, "output folder")
        assert "\n" not in str(info.value)


def test_a_symlink_inside_the_root_that_points_outside_is_refused(layout):
    root, outside = layout
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "inside_link").symlink_to(root / "inside", target_is_directory=True)
    with pytest.raises(PathError):
        ensure_inside(root, root / "link")
    with pytest.raises(PathError):
        ensure_inside(root, root / "link" / "run_v1")
    assert ensure_inside(root, root / "inside_link") == (root / "inside").resolve()


def test_remove_tree_deletes_inside_only(layout):
    root, outside = layout
    remove_tree(root / "missing", root)  # nothing to do
    for path in (outside, root / ".." / "outside", root):
        with pytest.raises(PathError):
            remove_tree(path, root)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathError):
        remove_tree(root / "link", root)
    (root / "inside_link").symlink_to(root / "inside", target_is_directory=True)
    remove_tree(root / "inside_link", root)  # the link goes, never what it points to
    assert not (root / "inside_link").exists() and (root / "inside" / "keep.txt").is_file()
    remove_tree(root / "inside", root)
    assert not (root / "inside").exists() and root.is_dir()
    assert (outside / "sentinel.txt").read_text() == "must survive"


def test_remove_file_deletes_inside_only(layout):
    root, outside = layout
    remove_file(root / "inside" / "missing.txt", root)
    for path in (outside / "sentinel.txt", root / ".." / "outside" / "sentinel.txt"):
        with pytest.raises(PathError):
            remove_file(path, root)
    (root / "inside" / "link.txt").symlink_to(outside / "sentinel.txt")
    with pytest.raises(PathError):
        remove_file(root / "inside" / "link.txt", root)
    with pytest.raises(PathError):
        remove_file(root / "inside", root)  # a folder is not a file
    remove_file(root / "inside" / "keep.txt", root)
    assert not (root / "inside" / "keep.txt").exists()
    assert (outside / "sentinel.txt").read_text() == "must survive"


def test_remove_reports_does_not_follow_a_symlinked_qualitative_folder(layout):
    root, outside = layout
    folder = paths.eval_report_dir(root, "run_v1")
    folder.mkdir(parents=True)
    (folder / "summary.md").write_text("old")
    (folder / QUALITATIVE_DIR).symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathError):
        remove_reports(folder)
    assert (outside / "sentinel.txt").read_text() == "must survive"


# --------------------------------------------------------------------------- data file names


def test_safe_ids_of_hostile_sample_ids_stay_inside_the_root(tmp_path):
    root = tmp_path / "project"
    sample_ids = ["../../../etc/passwd", "../x", "group/..", "..\\..\\win/stem", "./.", ".hidden/.stem",
                  "g/a b?*:<>|\0", "/abs/x", "g/" + "../" * 80 + "deep"]
    safe_ids = make_safe_ids(sample_ids)
    assert len(set(safe_ids.values())) == len(sample_ids)
    for safe_id in safe_ids.values():
        assert check_component(safe_id, "safe_id") == safe_id and not safe_id.startswith(".")
        path = paths.promptset_path(root, "train", safe_id)
        assert ensure_inside(root, path).parent == (root / paths.PROMPT_SET_DIR / "train").resolve()


# --------------------------------------------------------------------------- the real scripts

SCRIPT_CASES = [
    ("train_head.py", ["--run_id", "../../outside", "--force"], "--run_id"),
    ("train_head.py", ["--run_id", "/abs/x", "--force"], "--run_id"),
    ("train_head.py", ["--model", "variance", "--run_id", "v1", "--head_run_id", "../h"], "--head_run_id"),
    ("evaluate_uncertainty.py", ["--run_id", "/../../x"], "--run_id"),
    ("evaluate_uncertainty.py", ["--name", "../x"], "--name"),
    ("evaluate_uncertainty.py", ["--fusion_run_id", "a/b"], "--fusion_run_id"),
    ("fit_laplace.py", ["--run_id", ".."], "--run_id"),
]


def snapshot(folder: Path) -> set[str]:
    """Every path under ``folder``, except the library cache a stage script makes in its project root
    when it starts (``core.library_caches``: matplotlib writes there, not to $HOME, at import), and
    a project root that holds nothing else."""
    paths = {str(path.relative_to(folder)) for path in folder.rglob("*")}
    caches = {p for p in paths if Path(p).parent.name == "project" and Path(p).name == ".cache"}
    paths = {p for p in paths if not any(p == c or p.startswith(c + "/") for c in caches)}
    roots = {str(Path(c).parent) for c in caches}
    return {p for p in paths if p not in roots or any(q.startswith(p + "/") for q in paths)}


@pytest.fixture
def empty_project(tmp_path):
    """A config whose (not yet created) project root sits two levels below ``tmp_path``, and a
    sentinel folder with a file where ``../../outside`` from a run folder would land."""
    base = tmp_path / "base"
    base.mkdir()
    config = write_config(base, base / "images", base / "masks")
    sentinel = tmp_path / "outside"
    sentinel.mkdir()
    (sentinel / "sentinel.txt").write_text("must survive")
    return config, base / "project", tmp_path


def refused(script: str, config: Path, *args: str, flag_or_key: str) -> None:
    """Run ``script`` in this process (``call_stage``: the refusals happen before any model work, so
    a process start per case would only cost time) and check its one-line refusal."""
    result = call_stage(Path(script).stem, "--config", str(config), *args)
    assert result.code == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag_or_key}"), result.stderr


@pytest.mark.parametrize("script, args, flag", SCRIPT_CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in SCRIPT_CASES])
def test_scripts_refuse_ids_that_leave_the_project_root(empty_project, script, args, flag):
    config, root, top = empty_project
    before = snapshot(top)
    refused(script, config, *args, flag_or_key=flag)
    assert snapshot(top) == before  # nothing created (but the library cache) and nothing deleted
    assert (top / "outside" / "sentinel.txt").read_text() == "must survive"
    assert not root.exists() or [p.name for p in root.iterdir()] == [".cache"]


def test_force_does_not_follow_a_symlinked_checkpoint_folder_out_of_the_root(empty_project):
    config, root, top = empty_project
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "head").symlink_to(top / "outside", target_is_directory=True)
    before = snapshot(top)
    refused("train_head.py", config, "--run_id", "v1", "--force", flag_or_key="output folder")
    assert snapshot(top) == before
    assert (top / "outside" / "sentinel.txt").read_text() == "must survive"


def test_a_config_model_type_that_is_a_path_is_refused(empty_project):
    config, root, top = empty_project
    refused("train_head.py", config, "--set", "sam.model_type=../../x", flag_or_key="sam.model_type")
    assert not root.exists()



def test_library_caches_go_into_the_project_root_not_home(tmp_path):
    """matplotlib is imported (by torchmetrics, via laplace-torch) before any stage reads its config;
    the scripts point its config folder and font cache into the project root first, so a stage
    writes nothing under $HOME. ``--help`` stops right after the imports, where the writes happen."""
    home = tmp_path / "home"
    home.mkdir()
    config = write_config(tmp_path, tmp_path / "images", tmp_path / "masks")
    env = {"HOME": str(home), "XDG_CONFIG_HOME": "", "XDG_CACHE_HOME": "", "MPLCONFIGDIR": ""}
    result = run_stage("evaluate_uncertainty.py", config, "--help", env=env)
    assert "usage" in result.stdout
    assert list(home.iterdir()) == []
    assert list((tmp_path / "project" / ".cache" / "matplotlib").glob("fontlist-*.json"))
