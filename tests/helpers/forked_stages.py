"""A stage-script runner that pays the import cost once: a server process imports every stage module,
then forks one child per stage run, and the child runs the top-level script as ``__main__``.

Each child is a real process with its own pid, exit status and file descriptors, so a SIGKILL at any
moment (by the ``PIPELINE_TEST_KILL_AFTER_UNITS`` hook or by the test) hits the stage exactly as it
would hit ``python <script>``; only the ~7 s of importing torch, the SAM code and laplace-torch are
shared. The server never runs a torch operation itself: a child forked after its parent ran an OpenMP
parallel region can hang, so all tensor work happens in the children.

Protocol (JSON lines on the server's stdin / stdout): the test sends ``{"script", "args", "env",
"stdout", "stderr"}``; the server answers ``{"pid"}`` once the child is forked, then ``{"returncode"}``
(``-9`` after SIGKILL) once it has ended.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Imported once by the server, so that children start without import cost.
PRELOADED = ("modules.stages.build_manifests", "modules.stages.generate_promptsets",
             "modules.stages.precompute_sam_outputs", "modules.stages.visualize_sanity",
             "modules.stages.build_training_indices", "modules.stages.pack_to_hdf5", "modules.stages.train_head",
             "modules.stages.fit_laplace", "modules.stages.evaluate_uncertainty", "matplotlib.pyplot")


@dataclass
class StageRun:
    """One finished (or killed) stage run: exit status (negative: the signal), output, wall time."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _run_child(request: dict) -> None:
    """In the forked child: redirect output, apply the environment, run the script, exit with its status."""
    code = 1
    sys.stdout = sys.__stdout__  # the server points sys.stdout at stderr; the child's goes to its file
    try:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.environ.update(request["env"])
        sys.argv = [request["script"], *request["args"]]
        try:
            runpy.run_path(str(REPO / request["script"]), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The server's loop (run as ``python -c``): preload, then fork one child per request line."""
    warnings.simplefilter("ignore")
    os.chdir(REPO)
    for name in PRELOADED:
        importlib.import_module(name)
    replies = sys.stdout
    sys.stdout = sys.stderr  # nothing the stages print may reach the protocol channel
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(request)
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


class StageServer:
    """The test's side: start the server once, then ``run`` stage scripts in forked children."""

    def __init__(self, log_dir: Path, env: dict | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from tests.helpers.forked_stages import serve; serve()"], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log_dir / "server.err", "w"),
            text=True, env={**os.environ, "WANDB_MODE": "offline", **(env or {})})
        assert self._reply().get("ready"), "stage server did not start"

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"stage server died: {(self.log_dir / 'server.err').read_text()[-2000:]}")
        return json.loads(line)

    def run(self, script: str, config: Path, *args: str, env: dict | None = None,
            kill_after_s: float | None = None) -> StageRun:
        """Run ``script --config config *args`` in a fresh child; ``kill_after_s`` SIGKILLs it after
        that many seconds unless it ended before."""
        self.count += 1
        out, err = (self.log_dir / f"{self.count:03d}.{kind}" for kind in ("out", "err"))
        request = {"script": script, "args": ["--config", str(config), *args], "env": env or {},
                   "stdout": str(out), "stderr": str(err)}
        started = time.perf_counter()
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = self._reply()["pid"]
        if kill_after_s is not None:
            time.sleep(kill_after_s)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # already ended and reaped
                pass
        returncode = self._reply()["returncode"]
        return StageRun(returncode, out.read_text(), err.read_text(), time.perf_counter() - started)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
