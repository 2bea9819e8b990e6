"""The forked stage runner (``tests/helpers/forked_stages.py``) runs a script as ``python SCRIPT ARGS``
would: the same exit code, output, environment, arguments, working folder, exit handlers and
threads, and a fresh interpreter where the environment changes what its preloaded libraries read at
start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers.forked_stages import StageServer
from tests.stage_runner import REPO, run_stage

SCRIPT = textwrap.dedent("""
    import atexit, json, os, sys, threading, time
    import numpy, torch
    mode = sys.argv[sys.argv.index("--mode") + 1]
    out = sys.argv[sys.argv.index("--out") + 1]
    def late_write():
        time.sleep(0.3)
        with open(out + ".thread", "w") as f:
            f.write("joined")
    threading.Thread(target=late_write).start()
    atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
    record = dict(argv=sys.argv[1:], cwd=os.getcwd(), path0=sys.path[0], marker=os.environ.get("RUNNER_MARKER"),
                  threads=torch.get_num_threads(), pid=os.getpid(), stdin=sys.stdin.read(),
                  main=__name__, draw=float(numpy.random.rand()))
    with open(out, "w") as f:
        json.dump(record, f)
    print("to stdout")
    print("to stderr", file=sys.stderr)
    if mode == "raise":
        raise ValueError("boom")
    if mode == "message":
        sys.exit("a one-line error")
    if mode == "sleep":
        time.sleep(60)
    sys.exit(3 if mode == "three" else 0)
""")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = StageServer(tmp_path_factory.mktemp("server_logs"), preload="libraries")
    yield server
    server.close()


def _both(server, tmp_path, mode: str, **env):
    """The script run by the server and by a fresh interpreter: (run, record) for each."""
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    results = []
    for name in ("forked", "fresh"):
        out = tmp_path / f"{name}.json"
        args = ["--mode", mode, "--out", str(out)]
        if name == "forked":
            run = server.run(str(script), tmp_path / "config.yaml", *args, env=env)
            code, stdout, stderr = run.returncode, run.stdout, run.stderr
        else:
            done = subprocess.run([sys.executable, str(script), "--config", str(tmp_path / "config.yaml"), *args],
                                  cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  env={**server.env, **env}, timeout=120)
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        record = json.loads(out.read_text())
        assert (tmp_path / f"{name}.json.thread").read_text() == "joined"
        assert (tmp_path / f"{name}.json.atexit").read_text() == "ran"
        results.append((code, stdout, stderr, record))
    return results


def test_a_forked_run_is_what_a_fresh_interpreter_gives(server, tmp_path):
    (code, stdout, stderr, record), (fresh_code, fresh_stdout, fresh_stderr, fresh) = _both(
        server, tmp_path, "three", RUNNER_MARKER="m1", OMP_NUM_THREADS=server.env.get("OMP_NUM_THREADS", "1"))
    assert code == fresh_code == 3
    assert stdout == fresh_stdout == "to stdout\n"
    assert stderr.endswith("to stderr\n") and fresh_stderr.endswith("to stderr\n")
    assert record["pid"] not in (os.getpid(), server.process.pid)
    assert record["draw"] != fresh["draw"]  # numpy's global generator is seeded afresh in each
    assert record["argv"][:-1] == fresh["argv"][:-1] and record["argv"][-1].endswith("forked.json")
    for key in ("cwd", "path0", "marker", "threads", "stdin", "main"):
        assert record[key] == fresh[key], key
    assert record["marker"] == "m1" and record["main"] == "__main__" and record["stdin"] == ""


@pytest.mark.parametrize("mode, expected_code, expected_end", [
    ("raise", 1, "ValueError: boom\n"), ("message", 1, "a one-line error\n"), ("zero", 0, "to stderr\n")])
def test_exit_codes_and_uncaught_errors_match(server, tmp_path, mode, expected_code, expected_end):
    (code, _, stderr, _), (fresh_code, _, fresh_stderr, _) = _both(server, tmp_path, mode)
    assert code == fresh_code == expected_code
    assert stderr.endswith(expected_end) and fresh_stderr.endswith(expected_end)
    assert ("Traceback" in stderr) == ("Traceback" in fresh_stderr) == (mode == "raise")


def test_a_kill_and_a_timeout_end_the_child_and_not_the_server(server, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    args = ("--mode", "sleep", "--out", str(tmp_path / "slow.json"))
    killed = server.run(str(script), tmp_path / "config.yaml", *args, kill_after_s=2)
    assert killed.returncode == -9 and killed.seconds < 30
    with pytest.raises(subprocess.TimeoutExpired):
        server.run(str(script), tmp_path / "config.yaml", *args, timeout=2)
    again = server.run(str(script), tmp_path / "config.yaml", "--mode", "zero", "--out", str(tmp_path / "z.json"))
    assert again.returncode == 0


def test_an_environment_read_at_start_up_gets_a_fresh_interpreter(server):
    environment = dict(server.env)
    assert server.accepts(environment)
    assert server.accepts({**environment, "SLURM_ARRAY_TASK_ID": "1", "RANK": "0"})
    assert not server.accepts({**environment, "PYTHONPATH": "/elsewhere"})
    assert not server.accepts({**environment, "OMP_NUM_THREADS": "97"})
    assert not server.accepts({key: value for key, value in environment.items() if key != "PATH"})


def test_run_stage_gives_a_stages_one_line_error_either_way(tmp_path, monkeypatch):
    missing = tmp_path / "missing.yaml"
    forked = run_stage("build_manifests.py", missing, check=False)
    monkeypatch.setenv("STAGE_RUNNER_FORK", "0")
    fresh = run_stage("build_manifests.py", missing, check=False)
    assert forked.returncode == fresh.returncode == 2
    assert forked.stdout == fresh.stdout and forked.stderr == fresh.stderr
    assert forked.stderr.strip().endswith(f"--config: no such file {missing}")
