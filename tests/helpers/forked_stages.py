"""A stage-script runner that pays the import cost once: a server process imports the stages' heavy
modules, then forks one child per stage run, and the child runs the top-level script as ``__main__``.

Each child is a real process with its own pid, exit status, environment, arguments and file
descriptors (stdin from ``/dev/null``, stdout and stderr into files), so a SIGKILL at any moment (by
the ``PIPELINE_TEST_KILL_AFTER_UNITS`` hook or by the test) hits the stage exactly as it would hit
``python <script>``; it joins its non-daemon threads and runs its ``atexit`` handlers before it exits
with the script's code, as the interpreter does. Only the imports are shared: starting a stage script
costs 7-12 s of them on the 2-core CI machine (torch; torchvision, which imports ``torch._dynamo``;
``segment_anything``; ``sam2``; laplace-torch), while most stage runs of the tests take a second or
two. The server never runs a torch operation itself: a child forked after its parent ran an OpenMP
parallel region can hang, so all tensor work happens in the children.

Two preload sets (``PRELOAD``):

- ``stages``: every stage module and matplotlib (``tests/test_fault_injection.py``, whose server has
  a HOME of its own and accounts for the font cache that matplotlib's import leaves there).
- ``libraries``: the third-party libraries without matplotlib or anything that imports it
  (laplace-torch), for ``tests/stage_runner.py: run_stage``: every stage points ``MPLCONFIGDIR`` into
  its own project root before it imports matplotlib (``modules/core/library_caches.py``), and a
  preloaded matplotlib would keep the server's.

What the preloaded libraries and the interpreter read from the environment at start-up (thread
counts, library paths; ``IMPORT_TIME_VARIABLES``) is the server's: ``StageServer.accepts`` tells a
caller when a run needs a fresh interpreter instead. ``OMP_NUM_THREADS`` is applied in the child
with ``torch.set_num_threads``, and numpy's global generator is seeded afresh, as in a new process.

Protocol (JSON lines on the server's stdin / stdout): the test sends ``{"script", "args", "env",
"stdout", "stderr"}``; the server answers ``{"pid"}`` once the child is forked, then ``{"returncode"}``
(``-9`` after SIGKILL, as ``subprocess`` reports a signal) once it has ended. End of stdin ends it.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_LIBRARIES = ("numpy", "torch", "torchvision", "segment_anything", "sam2", "sam2.build_sam", "pandas", "h5py",
              "scipy.ndimage", "scipy.special", "scipy.signal", "PIL.Image", "yaml", "tqdm")
#: Preload set name -> the modules the server imports before its first fork.
PRELOAD: dict[str, tuple[str, ...]] = {
    "stages": ("modules.stages.build_manifests", "modules.stages.generate_promptsets",
               "modules.stages.precompute_sam_outputs", "modules.stages.visualize_sanity",
               "modules.stages.build_training_indices", "modules.stages.pack_to_hdf5", "modules.stages.train_head",
               "modules.stages.fit_laplace", "modules.stages.evaluate_uncertainty", "matplotlib.pyplot"),
    "libraries": _LIBRARIES,
}
#: Prefixes of the environment variables read at start-up by the interpreter or the preloaded
#: libraries: a child sees the server's values of these, not its own.
IMPORT_TIME_VARIABLES = ("PYTHON", "LD_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "CUDA", "TORCH",
                         "PYTORCH", "TQDM_", "HDF5_", "HYDRA", "MPL", "HOME", "XDG_")


@dataclass
class StageRun:
    """One finished (or killed) stage run: exit status (negative: the signal), output, wall time."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _exit_code(exc: SystemExit) -> int:
    """What the interpreter makes of an uncaught ``SystemExit``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _run_child(request: dict) -> None:
    """In the forked child: become ``python SCRIPT ARGS`` and exit with its status. Never returns."""
    code = 1
    sys.stdout = sys.__stdout__  # the server points sys.stdout at stderr; the child's goes to its file
    try:
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.close(stdin)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.environ.clear()
        os.environ.update(request["env"])
        if "torch" in sys.modules and os.environ.get("OMP_NUM_THREADS"):
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        script = str(REPO / request["script"])
        sys.argv = [script, *request["args"]]
        sys.path[0] = str(Path(script).parent)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:  # what the interpreter prints for an uncaught exception
            sys.excepthook(*sys.exc_info())
            code = 1
        threading._shutdown()  # the interpreter's exit: join non-daemon threads, then atexit
        atexit._run_exitfuncs()
    except BaseException:  # the child could not become the script (an output file, the environment)
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(preload: str = "stages") -> None:
    """The server's loop (run as ``python -c``): import ``PRELOAD[preload]``, then fork one child per
    request line."""
    os.chdir(REPO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an import-time notice is the child's to print, where it would
        for name in PRELOAD[preload]:
            importlib.import_module(name)
    replies = sys.stdout
    sys.stdout = sys.stderr  # nothing the stages print may reach the protocol channel
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(request)
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


class StageServer:
    """The test's side: start the server once, then ``run`` stage scripts in forked children, one at
    a time.

    ``env``: variables set for the server and every child on top of this process's environment.
    """

    def __init__(self, log_dir: Path, env: dict | None = None, preload: str = "stages") -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
        self.lock = threading.Lock()
        self._pending = b""  # what was read from the server beyond its last full line
        with open(self.log_dir / "server.err", "w") as server_err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", f"from tests.helpers.forked_stages import serve; serve({preload!r})"],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=server_err, env=self.env)
        assert (self._reply(timeout=600) or {}).get("ready"), "stage server did not start"

    def accepts(self, env: dict) -> bool:
        """Whether ``run(..., env=env)``, ``env`` a complete environment, starts the script as
        ``python <script>`` with ``env`` would: the server runs, every variable it has is in ``env``
        (the child's environment is the server's with ``env`` on top), and what is read at start-up
        is the same."""
        keys = {key for key in (*env, *self.env) if key.startswith(IMPORT_TIME_VARIABLES)}
        return (self.process.poll() is None and set(self.env) <= set(env)
                and all(env.get(key) == self.env.get(key) for key in keys))

    def _reply(self, timeout: float | None = None) -> dict | None:
        """The server's next message; None after ``timeout`` seconds without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.process.stdout], [], [], wait)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"stage server died: {(self.log_dir / 'server.err').read_text()[-2000:]}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, script: str, config: Path, *args: str, env: dict | None = None,
            kill_after_s: float | None = None, timeout: float | None = None) -> StageRun:
        """Run ``script --config config *args`` in a fresh child with the server's environment and
        ``env`` on top. ``kill_after_s`` SIGKILLs it after that many seconds unless it ended before;
        past ``timeout`` seconds it is killed and ``subprocess.TimeoutExpired`` raised."""
        with self.lock:
            self.count += 1
            out, err = (self.log_dir / f"{self.count:03d}.{kind}" for kind in ("out", "err"))
            request = {"script": script, "args": ["--config", str(config), *args], "env": {**self.env, **(env or {})},
                       "stdout": str(out), "stderr": str(err)}
            started = time.perf_counter()
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            pid = self._reply()["pid"]
            limits = [limit for limit in (kill_after_s, timeout) if limit is not None]
            reply = self._reply(timeout=min(limits) if limits else None)
            if reply is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # ended and reaped meanwhile
                    pass
                reply = self._reply()
                if timeout is not None and timeout == min(limits):
                    raise subprocess.TimeoutExpired([script, *request["args"]], timeout,
                                                    out.read_text(errors="replace"), err.read_text(errors="replace"))
            return StageRun(reply["returncode"], out.read_text(errors="replace"), err.read_text(errors="replace"),
                            time.perf_counter() - started)

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        self.process.wait(timeout=60)
