"""The suite's xdist grouping (``tests/conftest.py``) takes effect: the pipeline fixtures are built on
one worker only when pytest-xdist reads the ``xdist_group`` marks. It reads them by renaming each
test's node id to ``<id>@<group>``, which pytest 9 no longer honours (its node ids moved), so a
pytest / pytest-xdist pair where this silently stops working would build every session fixture once
per worker; ``requirements.txt`` pins a pair where it works."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import xdist_group_name
from tests.stage_runner import REPO


def test_loadgroup_sends_a_files_tests_to_one_worker_under_its_group_name():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "-v",
         "tests/test_click_simulation.py", "-k", "round_robin or bad_settings"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = [line for line in result.stdout.splitlines() if "PASSED" in line]
    assert len(passed) == 2 and all(line.rstrip().endswith("@test_click_simulation.py") for line in passed), passed
    assert len({line.split()[0] for line in passed}) == 1  # one worker ran both


def test_only_the_tests_that_use_a_pipeline_fixture_share_its_group():
    assert xdist_group_name(["tmp_path", "trained_project", "packed_project"], "test_a.py") == "pipeline"
    assert xdist_group_name({"fusion_project"}, "test_b.py") == "pipeline"
    assert xdist_group_name(["tmp_path", "tool"], "test_a.py") == "test_a.py"
    assert xdist_group_name([], "test_c.py") == "test_c.py"
