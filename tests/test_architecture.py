"""The house plan, checked: no import cycle inside the package, layers import downwards only,
and --help of every entry point imports no torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "medsegx"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """medsegx modules imported by ``path`` at any level of its code (function-level imports count too).
    ``from pkg import submodule`` imports the submodule (and the package's ``__init__`` only when a name
    of its own is taken from it)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("medsegx"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("medsegx"):
                subs = {f"{target}.{a.name}" for a in node.names}
                found.update(subs & modules)
                if subs - modules:
                    found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = {d for d in _imports(path, set(modules)) if d in modules and d != name}
        # importing a package runs its __init__, a module of its own
        graph[name] = deps
    return graph


def test_no_import_cycle_in_the_package():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ re-exporting from its own modules is not a cycle of the code
    cycles = [c for c in cycles if not any(a == b.rsplit(".", 1)[0] or b == a.rsplit(".", 1)[0]
                                            for a, b in zip(c, c[1:]))]
    assert not cycles, cycles


@pytest.mark.parametrize("low, high", [("medsegx.model", "medsegx.recipes"), ("medsegx.data", "medsegx.model"),
                                       ("medsegx.metrics", "medsegx.model"), ("medsegx.metrics", "medsegx.data"),
                                       ("medsegx.data", "medsegx.engine"), ("medsegx.model", "medsegx.engine")])
def test_lower_layers_do_not_import_higher_ones(low, high):
    graph = _graph()
    wrong = {m: sorted(d for d in deps if d == high or d.startswith(high + "."))
             for m, deps in graph.items() if m == low or m.startswith(low + ".")}
    assert not {m: d for m, d in wrong.items() if d}


@pytest.mark.parametrize("module, heavy", [
    ("medsegx.data.meta", ("SimpleITK", "torch")),            # the evaluation reads spacings through it
    ("medsegx.data.presets", ("SimpleITK", "torch", "numpy")),  # the parsers read their choices from it
])
def test_light_data_modules_import_no_heavy_package(module, heavy):
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _house_plan() -> dict[str, set[str]]:
    """docs/ARCHITECTURE.md's table: each row's modules or packages -> the names its last column allows."""
    import re

    plan = {}
    for line in (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        allowed = {f"medsegx.{n}" for n in re.findall(r"`([\w.]+)`", cells[-1])}
        for name in re.findall(r"`([\w.]+)/?`", cells[0]):
            plan["medsegx" if name == "medsegx" else f"medsegx.{name}"] = allowed
    return plan


def _row_of(module: str, plan: dict[str, set[str]]) -> str | None:
    for key in sorted(plan, key=len, reverse=True):
        if module == key or module.startswith(key + ".") and key != "medsegx":
            return key
    return "medsegx" if module == "medsegx" else None


def test_every_import_is_one_the_architecture_table_allows():
    plan, graph = _house_plan(), _graph()
    assert "medsegx.inference" in plan and "medsegx.serve" in plan and "medsegx.selection" in plan
    unplaced = sorted(m for m in graph if _row_of(m, plan) is None)
    assert not unplaced, f"modules in no row of docs/ARCHITECTURE.md: {unplaced}"
    wrong = {}
    for module, deps in graph.items():
        row = _row_of(module, plan)
        for dep in deps:
            if _row_of(dep, plan) == row:
                continue  # within its own package or row
            if not any(dep == a or dep.startswith(a + ".") for a in plan[row]):
                wrong.setdefault(module, []).append(dep)
    assert not wrong, f"imports docs/ARCHITECTURE.md does not allow: {wrong}"
