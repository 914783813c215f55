"""The package's shape: no import cycle among ``lit_dar`` modules (imports inside functions counted), no module
past its size limit, and the lab code (benchmark, study) outside the installed package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lit_dar"
MAX_LINES = 450
LIMITS = {"bank.py": 700}  # the bank's fast path


def _imports(path: Path) -> set[str]:
    """Every ``lit_dar`` module ``path`` imports, at any depth (functions, ``if`` blocks, ``try``);
    ``from lit_dar import X`` is an import of ``__init__`` (and of ``X`` when it is a module). Imports under
    ``if TYPE_CHECKING:`` are for annotations only and never run: they are not edges."""
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "lit_dar"]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lit_dar":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def _graph() -> dict[str, set[str]]:
    """Module → the modules it imports. ``__init__``'s lazy Lightning exports (``importlib`` on first attribute
    access) are not edges: they load after the package is initialised."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {p.stem: (_imports(p) & modules) - {p.stem} for p in PACKAGE.glob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_imports_of_the_package_have_no_cycle() -> None:
    graph = _graph()
    assert {"cli", "run", "recipe", "report", "patch"} <= set(graph)
    assert "cli" not in graph["run"] and "cli" not in graph["recipe"]
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_cycle_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from lit_dar.cli import main\n    import lit_dar.run\n"
                      "    from lit_dar import DARConfig\n")
    assert _imports(module) == {"cli", "run", "__init__", "DARConfig"}  # names that are no module drop out later
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_too_long() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    too_long = {n: s for n, s in sizes.items() if s > LIMITS.get(n, MAX_LINES)}
    assert not too_long, too_long


def test_lab_code_is_outside_the_package() -> None:
    assert not (PACKAGE / "bench.py").exists() and not (PACKAGE / "study.py").exists()
    root = PACKAGE.parent
    assert (root / "benchmarks" / "bench.py").is_file() and (root / "experiments" / "study.py").is_file()
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        assert "ctypes" not in text and "threading" not in text, path.name
        assert '"docs/' not in text and "'docs/" not in text, path.name  # nothing writes into docs/ by default
