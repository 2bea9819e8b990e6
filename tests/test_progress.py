"""Progress of long loops (``modules/core/progress.py``) and the console of a stage whose output is a
file (``modules/core/console.py``): timestamped lines with done/total, rate and ETA, no bar."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from modules.core import progress
from modules.core.console import configure_logging
from modules.core.progress import Progress, TrackedIterable
from tests.conftest import small_demo_config
from tests.stage_runner import REPO

TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def progress_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "pipeline.progress"]


def test_lines_every_interval_with_counts_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    clock = FakeClock()
    bar = Progress(10, "evaluating", "samples", terminal=False, interval_s=10, clock=clock)
    clock.now += 4
    bar.update(2)  # 4 s after the start: no line yet
    assert progress_lines(caplog) == []
    clock.now += 6
    bar.update(2, loss="0.5")  # 10 s: 4 done at 0.4/s, 6 left -> ETA 15 s
    clock.now += 5
    bar.update()  # 5 s after the last line: none
    assert progress_lines(caplog) == ["evaluating: 4/10 samples (40%), 0.4 samples/s, ETA 0:00:15, loss=0.5"]
    clock.now += 5
    bar.update(5)
    bar.close()
    bar.close()  # twice is once
    assert progress_lines(caplog)[1:] == ["evaluating: 10/10 samples (100%), 0.5 samples/s, ETA 0:00:00, loss=0.5",
                                          "evaluating: 10/10 samples done in 0:00:20, 0.5 samples/s, loss=0.5"]


def test_skipped_units_count_as_done_but_not_toward_the_rate(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    clock = FakeClock()
    bar = Progress(100, "prompt sets", "units", terminal=False, interval_s=10, clock=clock)
    bar.skip(90)  # finished before: instant
    clock.now += 10
    bar.update(2)  # 2 computed in 10 s; 8 left -> 40 s
    assert progress_lines(caplog) == ["prompt sets: 92/100 units (92%), 0.2 units/s, ETA 0:00:40"]


def test_a_short_loop_and_a_disabled_one_print_nothing(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    assert list(progress.track(range(5), "short", unit="units")) == list(range(5))  # default interval 30 s
    with Progress(3, "rank 1", terminal=False, interval_s=0, enabled=False) as bar:
        bar.update(3)
    assert progress_lines(caplog) == []
    with pytest.raises(ValueError, match="must be >= 0"):
        progress.set_interval(-1)


def test_tracked_iterable_keeps_the_loaders_attributes(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")

    class Loader(list):
        dataset = "the data set"

    tracked = TrackedIterable(Loader([1, 2, 3]), "laplace fit", "chunks")
    assert tracked.dataset == "the data set" and len(tracked) == 3 and list(tracked) == [1, 2, 3]


@pytest.fixture
def restore_logging():
    handlers, level = list(logging.root.handlers), logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def test_noisy_third_party_warnings_hidden_unless_verbose(capsys, restore_logging):
    with warnings.catch_warnings():
        configure_logging(verbose=False)
        warnings.warn("`torch.jit.script` is deprecated. Please switch to torch.compile", FutureWarning)
    assert "torch.jit.script" not in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as seen:
        configure_logging(verbose=True)
        warnings.warn("`torch.jit.script` is deprecated. Please switch to torch.compile", FutureWarning)
    assert [str(w.message) for w in seen] == ["`torch.jit.script` is deprecated. Please switch to torch.compile"]
    logging.getLogger("pipeline").info("to stdout")
    logging.getLogger("pipeline").warning("to stderr")
    out, err = capsys.readouterr()
    assert re.search(f"^{TIMESTAMP} INFO pipeline: to stdout$", out, re.M) and "to stderr" not in out
    assert re.search(f"^{TIMESTAMP} WARNING pipeline: to stderr$", err, re.M)


def test_a_stage_writing_to_a_file_logs_timestamped_progress_lines(tmp_path):
    """Stages 1 and 2 with stdout and stderr in one file (a cluster job's log): every line of the
    stage is timestamped, and ``--progress-every 0`` gives one progress line per prompt-set file."""
    config = small_demo_config(tmp_path, {"demo.scenes_per_group": 1})
    env = {**os.environ, "WANDB_MODE": "offline"}
    log_file = tmp_path / "job.log"
    for script, extra in (("build_manifests.py", []), ("generate_promptsets.py", ["--progress-every", "0"])):
        with open(log_file, "a") as out:
            subprocess.run([sys.executable, str(REPO / script), "--config", str(config), *extra], stdout=out,
                           stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=120, check=True)
    text = log_file.read_text()
    lines = text.splitlines()
    # every record starts with its timestamp (a multi-line one, like the summary, on its first line)
    assert all(re.match(TIMESTAMP, line) for line in lines if re.search(r" (INFO|WARNING|ERROR) ", line)), lines
    assert re.match(f"{TIMESTAMP} INFO pipeline: \\[build_manifests\\] project root", lines[0]), lines[0]
    assert "\r" not in text and "%|" not in text  # no tqdm bar
    split_sizes = {}
    for line in lines:
        found = re.search(r"pipeline\.progress: prompt sets \[(\w+)\]: (\d+)/(\d+) units \(\d+%\), [\d.e+]+ "
                          r"units/s, ETA \d+:\d\d:\d\d$", line)
        if found:
            split_sizes.setdefault(found[1], []).append((int(found[2]), int(found[3])))
    assert split_sizes, lines
    for counts in split_sizes.values():
        total = counts[0][1]
        assert [done for done, _ in counts] == list(range(1, total + 1))
    assert any(re.search(r"INFO pipeline: \[generate_promptsets\] finished in", line) for line in lines)
