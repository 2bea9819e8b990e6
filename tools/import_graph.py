"""The import structure of ``modules/``: cycles, layer violations, deferred imports, largest files.

    python tools/import_graph.py            # report; exit code 1 if a rule is broken
    python tools/import_graph.py --all      # also every module's project imports

Rules (``tests/test_import_graph.py`` holds the code to them):

- no import cycle between project modules (imports inside functions count too);
- a module imports only from its own layer or the layers below it (``LAYERS``, lowest first);
- a project import inside a function ("deferred") carries a ``# deferred: <reason>`` comment, on its
  line or the line above, and there are at most ``MAX_DEFERRED`` of them;
- no file in ``modules/`` is longer than ``MAX_LINES`` lines.

Imports under ``if TYPE_CHECKING:`` are annotations only and are left out.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "modules"
#: Subpackages of ``modules``, lowest layer first.
LAYERS = ("core", "data", "sam", "cache", "scoring", "training", "laplace", "uncertainty", "evaluation", "interactive",
          "stages")
MAX_LINES = 700
MAX_DEFERRED = 5
DEFERRED_TAG = "# deferred:"


@dataclass
class ProjectImport:
    source: str
    target: str
    line: int
    deferred: bool
    reason: str | None = None


@dataclass
class ModuleInfo:
    name: str
    path: Path
    lines: int
    imports: list[ProjectImport] = field(default_factory=list)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _targets(node: ast.Import | ast.ImportFrom, current: str, is_package: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = current.split(".") if is_package else current.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        # ``from modules.cache import packing`` imports the submodule when one exists.
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    return [name for name in names if name == PACKAGE or name.startswith(PACKAGE + ".")]


def _reason(source_lines: list[str], line: int) -> str | None:
    for text in (source_lines[line - 1], source_lines[line - 2] if line >= 2 else ""):
        if DEFERRED_TAG in text:
            return text.split(DEFERRED_TAG, 1)[1].strip() or None
    return None


def scan(repo: Path) -> dict[str, ModuleInfo]:
    """Every module under ``<repo>/modules`` with its project imports."""
    files = sorted((repo / PACKAGE).rglob("*.py"))
    known = {module_name(repo, path) for path in files}
    modules: dict[str, ModuleInfo] = {}
    for path in files:
        name = module_name(repo, path)
        text = path.read_text(encoding="utf-8")
        source_lines = text.splitlines()
        info = ModuleInfo(name, path, len(source_lines))
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking_block(child):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in dict.fromkeys(_targets(child, name, is_package, known)):
                        if target != name:
                            info.imports.append(ProjectImport(
                                name, target, child.lineno, in_function,
                                _reason(source_lines, child.lineno) if in_function else None))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(text, filename=str(path)), False)
        modules[name] = info
    return modules


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def connect(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))
    for node in sorted(edges):
        if node not in index:
            connect(node)
    return sorted(cycles)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


@dataclass
class Report:
    modules: dict[str, ModuleInfo]
    cycles: list[list[str]]
    layer_violations: list[ProjectImport]
    deferred: list[ProjectImport]
    oversized: list[ModuleInfo]

    @property
    def problems(self) -> list[str]:
        found = [f"import cycle: {' <-> '.join(cycle)}" for cycle in self.cycles]
        found += [f"layer violation: {imp.source} (line {imp.line}) imports the higher layer {imp.target}"
                  for imp in self.layer_violations]
        found += [f"deferred import without a '{DEFERRED_TAG}' reason: {imp.source} line {imp.line} -> {imp.target}"
                  for imp in self.deferred if not imp.reason]
        if len(self.deferred) > MAX_DEFERRED:
            found.append(f"{len(self.deferred)} deferred project imports (at most {MAX_DEFERRED})")
        found += [f"{info.path.as_posix()}: {info.lines} lines (at most {MAX_LINES})" for info in self.oversized]
        return found


def analyse(repo: Path) -> Report:
    modules = scan(repo)
    edges = {name: {imp.target for imp in info.imports} for name, info in modules.items()}
    violations = []
    for info in modules.values():
        for imp in info.imports:
            source_layer, target_layer = layer_of(imp.source), layer_of(imp.target)
            if source_layer is not None and target_layer is not None and target_layer > source_layer:
                violations.append(imp)
    deferred = [imp for info in modules.values() for imp in info.imports if imp.deferred]
    oversized = sorted((info for info in modules.values() if info.lines > MAX_LINES), key=lambda i: -i.lines)
    return Report(modules, find_cycles(edges), violations, deferred, oversized)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--largest", type=int, default=10, help="how many of the largest files to list")
    parser.add_argument("--all", action="store_true", help="list every module's project imports")
    args = parser.parse_args(argv)
    report = analyse(args.repo)
    print(f"{len(report.modules)} modules under {PACKAGE}/, layers (lowest first): {' < '.join(LAYERS)}")
    print(f"\nlargest files (at most {MAX_LINES} lines):")
    for info in sorted(report.modules.values(), key=lambda i: -i.lines)[:args.largest]:
        print(f"  {info.lines:5d}  {info.path.relative_to(args.repo).as_posix()}")
    print(f"\ndeferred project imports ({len(report.deferred)}, at most {MAX_DEFERRED}):")
    for imp in report.deferred:
        print(f"  {imp.source}:{imp.line} -> {imp.target}  ({imp.reason or 'NO REASON GIVEN'})")
    print(f"\nimport cycles: {len(report.cycles)}")
    for cycle in report.cycles:
        print("  " + " <-> ".join(cycle))
    if args.all:
        print("\nproject imports:")
        for name, info in sorted(report.modules.items()):
            targets = sorted({imp.target for imp in info.imports})
            print(f"  {name}: {', '.join(targets) or '-'}")
    problems = report.problems
    print(f"\n{len(problems)} problem(s)")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
