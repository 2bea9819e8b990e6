"""What a stage writes to the console: timestamped log lines, and which third-party warnings show.

``configure_logging`` sends INFO lines to stdout and WARNING and above to stderr, each with a
timestamp, and makes stdout line-buffered so that, written to a file (a cluster job), the lines
of ``print`` and ``logging`` keep their order and appear as they happen.

``NOISY_WARNINGS`` are third-party warnings a user cannot act on; they are hidden unless
``--verbose`` (which also shows DEBUG lines).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

#: (message regex, category, module regex) of third-party warnings hidden by default.
NOISY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # laplace-torch's curvature backends call torch.jit.script at import (torch 2.14 deprecates it)
    (r"`torch\.jit\.script` is deprecated", FutureWarning, ""),
    # DataLoader workers on a machine with fewer cores than asked for
    (r"This DataLoader will create \d+ worker processes", UserWarning, r"torch\.utils\.data"),
    # torch.amp on a CPU-only machine (training.amp is on by default for GPUs)
    (r".*CUDA is not available.*", UserWarning, r"torch\.amp"),
    (r"User provided device_type of 'cuda', but CUDA is not available", UserWarning, ""),
    # wandb and pydantic internals
    (r".*", DeprecationWarning, r"wandb(\.|$)"),
    (r".*", DeprecationWarning, r"pydantic(\.|$)"),
    # h5py/numpy and backpack internals deprecating APIs they themselves call
    (r".*", DeprecationWarning, r"(h5py|backpack|laplace)(\.|$)"),
    (r".*", FutureWarning, r"(backpack|laplace)(\.|$)"),
    # BackPACK's hooks during a Laplace fit: only the last layer is fitted, so no input needs a gradient
    (r"Full backward hook is firing when gradients are computed with respect to module outputs", UserWarning,
     r"laplace(\.|$)"),
    # submitit's pickling of the job functions
    (r".*", UserWarning, r"submitit(\.|$)"),
)


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class _FailingStreamHandler(logging.StreamHandler):
    """A stream handler that raises what writing raised (a full disk under a stdout redirected to a
    file) like ``print`` would, instead of logging's "--- Logging error ---" traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise error
        super().handleError(record)


def configure_logging(verbose: bool = False) -> None:
    """Timestamped logging for this process (INFO to stdout, WARNING+ to stderr); ``verbose``:
    DEBUG lines too and every third-party warning."""
    with contextlib.suppress(AttributeError, ValueError):  # a stdout without it (pytest's capture)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    out = _FailingStreamHandler(sys.stdout)
    out.addFilter(_BelowWarning())
    err = _FailingStreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
    # force: a library that logs through the root logger before this runs installs a WARNING-level
    # root handler (laplace-torch does at import), which would hide every INFO line of the stages.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[out, err], force=True)
    if not verbose:
        for name in ("matplotlib", "PIL", "h5py", "urllib3", "wandb", "git", "fsspec", "submitit"):
            logging.getLogger(name).setLevel(logging.WARNING)
    filter_noisy_warnings(verbose)


def filter_noisy_warnings(verbose: bool = False) -> None:
    """Hide ``NOISY_WARNINGS`` (``verbose``: show every warning, each once per location)."""
    if verbose:
        warnings.simplefilter("default")
        return
    for message, category, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)

