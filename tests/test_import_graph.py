"""The import structure of ``modules/`` (``tools/import_graph.py``): no cycle, layers respected,
few and explained deferred imports, no oversized file; and the checker finds each kind of breach."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.stage_runner import REPO
from tools import import_graph


def test_modules_keep_the_import_rules():
    report = import_graph.analyse(REPO)
    assert report.problems == []
    assert len(report.modules) > 30  # the scan saw the real tree


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_reports_cycles_layer_breaches_unexplained_deferred_imports_and_long_files(tmp_path):
    for package in ("modules", "modules/core", "modules/data", "modules/sam"):
        _write(tmp_path, f"{package}/__init__.py", "")
    # core.a -> core.b at the top, core.b -> core.a inside a function: a cycle, hidden as today's were.
    _write(tmp_path, "modules/core/a.py", "from modules.core import b\n")
    _write(tmp_path, "modules/core/b.py", "def f():\n    from modules.core.a import thing\n")
    # data imports the higher sam layer; the deferred one is explained.
    _write(tmp_path, "modules/data/reader.py",
           "from modules.sam import model\n\n\ndef g():\n    # deferred: optional heavy dependency\n"
           "    from modules.core import a\n")
    _write(tmp_path, "modules/sam/model.py", "x = 1\n" * (import_graph.MAX_LINES + 1))
    # An annotation-only import is not an import.
    _write(tmp_path, "modules/core/typed.py",
           "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from modules.sam import model\n")

    report = import_graph.analyse(tmp_path)

    assert report.cycles == [["modules.core.a", "modules.core.b"]]
    assert [(i.source, i.target) for i in report.layer_violations] == [("modules.data.reader", "modules.sam.model")]
    assert {(i.source, i.reason) for i in report.deferred} == {
        ("modules.core.b", None), ("modules.data.reader", "optional heavy dependency")}
    assert [info.name for info in report.oversized] == ["modules.sam.model"]
    problems = "\n".join(report.problems)
    assert "import cycle: modules.core.a <-> modules.core.b" in problems
    assert "modules.core.b line 2" in problems and "modules.data.reader line" not in problems
    assert "modules/sam/model.py: 701 lines" in problems

    result = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), "--repo", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "modules.core.a <-> modules.core.b" in result.stdout


def test_command_prints_the_graph_of_the_project():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), "--all"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "import cycles: 0" in result.stdout
    assert "deferred project imports" in result.stdout and "largest files" in result.stdout
    assert "modules.stages.train_head:" in result.stdout


def test_laplace_torch_is_imported_only_where_a_posterior_is_built():
    """laplace-torch and the torchmetrics it imports cost seconds per process; the stages import
    it only when they build or load a posterior (``laplace.head``), not to train the head. Imported
    then, after the stage has set up its logging, its notices about missing optional backends do not
    reach the log."""
    check = ("import sys\n"
             "import modules.stages.train_head, modules.stages.fit_laplace, modules.stages.evaluate_uncertainty\n"
             "import modules.interactive.predictor\n"
             "heavy = sorted(name for name in ('laplace', 'torchmetrics') if name in sys.modules)\n"
             "assert not heavy, heavy\n"
             "from modules.core.console import configure_logging\n"
             "from modules.laplace.head import resolve_backend\n"
             "configure_logging()\n"
             "assert resolve_backend('backpack').__name__ == 'BackPackGGN' and 'laplace' in sys.modules\n"
             "import logging; logging.getLogger('pipeline').info('still logging')\n")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("INFO pipeline: still logging"), result.stdout
    assert "backend" not in result.stdout + result.stderr, result.stdout + result.stderr
