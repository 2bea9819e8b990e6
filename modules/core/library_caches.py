"""Library caches inside the project root: nothing a stage runs writes to ``$HOME``.

matplotlib creates its config folder and font cache under ``$HOME`` when it is first imported,
unless ``MPLCONFIGDIR`` names another place, and it is imported at import time by libraries the
stages need (torchmetrics, via laplace-torch), long before ``stage_context`` has read the config.
So every stage script first imports ``modules.core.script_start``, which calls
``point_library_caches_from(sys.argv[1:])`` before any third-party library is imported;
``stage_context`` calls ``point_library_caches`` again for in-process callers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from modules.core.config import load_config
from modules.core.errors import PipelineError

#: Where matplotlib keeps its config and font cache, relative to the project root.
MATPLOTLIB_CACHE_DIR = Path(".cache") / "matplotlib"


def point_library_caches(project_root: Path) -> None:
    """Point the caches of libraries that write to ``$HOME`` into ``project_root`` (an explicit
    ``MPLCONFIGDIR`` of the user's wins; an empty one is unset to matplotlib too)."""
    if not os.environ.get("MPLCONFIGDIR"):
        os.environ["MPLCONFIGDIR"] = str(project_root / MATPLOTLIB_CACHE_DIR)


def project_root_from_command_line(argv: list[str]) -> Path | None:
    """The project root that ``--config``/``--set`` in ``argv`` give (the defaults of
    ``core.stage.default_argument_parser``), or None when they give none."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = parser.parse_known_args(argv)
    try:
        return load_config(known.config, known.overrides).project_root
    except (PipelineError, OSError, ValueError):
        return None


def point_library_caches_from(argv: list[str]) -> None:
    """``point_library_caches`` for the project root of a stage's command line, if it gives one.
    Validates nothing and never fails: a config that does not load is reported by
    ``stage_context`` a moment later, as usual."""
    root = project_root_from_command_line(argv)
    if root is not None:
        point_library_caches(root)
