"""The package's layout: every import points down the layers the README draws, and no module imports itself back."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

from imgclass import config

PACKAGE = Path(__file__).resolve().parents[1] / "imgclass"

# Lowest first. A module may import from its own layer or a lower one, never a higher one.
LAYERS = [
    ["imgclass.errors", "imgclass.log", "imgclass.config"],
    ["imgclass.process", "imgclass.web"],
    ["imgclass.testbed"],
    ["imgclass.serving"],
    ["imgclass.balancing"],
    ["imgclass.queue"],
    ["imgclass.local"],
    ["imgclass.measure"],
    ["imgclass.autoscale"],
    ["imgclass.cli", "imgclass.__main__", "imgclass"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and to the README's Architecture"
    return best[0]


def imports(path: Path) -> set[str]:
    """Every imgclass module this file imports, at module level or inside a function."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("imgclass")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("imgclass"):
                continue
            # `from . import x` and `from .pkg import mod` name modules too
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / candidate.replace(".", "/") / "__init__.py"
                ).exists():
                    found.add(candidate)
                else:
                    found.add(target)
    found.discard(here)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_points_down() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_no_import_circle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    # A package's __init__ imports nothing here, so a circle is always between real modules.
    assert cycles == []


def test_every_module_opens_with_a_one_line_docstring() -> None:
    missing = []
    for path in PACKAGE.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        if not doc or not doc.split("\n", 1)[0].strip():
            missing.append(str(path.relative_to(PACKAGE.parent)))
    assert missing == []


def test_settings_take_exactly_their_roles_options() -> None:
    from imgclass.balancing.settings import SOURCES, BalancerSettings
    from imgclass.serving.settings import ServerSettings

    assert [f.name for f in fields(ServerSettings)] == config.options_for(config.SERVE)
    assert {f.name for f in fields(BalancerSettings)} == set(config.options_for(config.BALANCE)) - set(SOURCES)
