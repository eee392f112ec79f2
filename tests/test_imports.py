"""The house's rooms: imports flow one way, no cycle between modules or subpackages, light ``__init__``s.

Every import is read from the source (``ast``), including those inside functions and under
``TYPE_CHECKING``, so a cycle hidden in a function body fails here before it bites at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nodulab"

ROOMS = ("common", "synth", "data", "training", "explanation", "studies", "results")
"""The subpackages in pipeline order (design.md "Pipeline and package layout")."""
MAY_IMPORT = {
    "common": set(),
    "synth": {"common"},
    "data": {"common", "synth"},
    "training": {"common", "synth", "data"},
    "explanation": {"common", "synth", "data", "training"},
    "results": {"common", "synth"},
    "studies": {"common", "synth", "data", "training", "explanation", "results"},
}
"""Which rooms each room may import: data flows one way; ``results`` reads only the store."""
HEAVY = ("torch", "sklearn", "matplotlib", "scipy", "pandas", "monai", "pytorch_metric_learning", "ray")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES.get(name) is not None and MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, int]]:
    """Every ``(imported module, line)`` in module ``name``: nodulab modules and third-party tops."""
    path = MODULES[name]
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target if target in MODULES else base, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        targets = {m for m, _ in _imports(name) if m in MODULES and m != "nodulab" and m != name}
        graph[name] = targets
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and _is_package(module)) else module


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path of nodes, or None (depth-first search, colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_sees_imports_inside_functions_and_type_checking() -> None:
    # the walker itself: a cycle hidden in a function body or under TYPE_CHECKING is an edge
    assert ("nodulab.training.runs",) and _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    inner = [m for m, _ in _imports("nodulab.cli")]
    assert "nodulab.training.loop" in inner  # imported inside a command function


def test_no_module_level_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_subpackage_level_cycle() -> None:
    rooms: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        rooms.setdefault(_room(module), set()).update(_room(t) for t in targets if _room(t) != _room(module))
    cycle = _cycle(rooms)
    assert cycle is None, "cycle between subpackages: " + " -> ".join(cycle or [])


def test_every_module_lives_in_a_room() -> None:
    top = {m for m in MODULES if m.count(".") == 1 and not _is_package(m)}
    assert top == {"nodulab.__main__", "nodulab.cli"}, f"modules outside the rooms: {sorted(top)}"
    assert {m.split(".")[1] for m in MODULES if _is_package(m) and m != "nodulab"} == set(ROOMS)


@pytest.mark.parametrize("room", ROOMS)
def test_imports_flow_one_way(room: str) -> None:
    wrong = sorted(
        {
            f"{m} imports {t} (line {line})"
            for m in MODULES
            if _room(m) == room
            for t, line in _imports(m)
            if t in MODULES and _room(t) in ROOMS and _room(t) != room and _room(t) not in MAY_IMPORT[room]
        }
    )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("room", ROOMS)
def test_room_init_is_light(room: str) -> None:
    # `import nodulab.<room>` must stay cheap: nodulab --help and the results room load no torch
    imported = [m for m, _ in _imports(f"nodulab.{room}")]
    assert not [m for m in imported if m.split(".")[0] in HEAVY or m.startswith("nodulab.")], imported


def test_results_needs_no_torch() -> None:
    heavy = sorted(
        {
            f"{m}: {t}"
            for m in MODULES
            if _room(m) == "results"
            for t, _ in _imports(m)
            if t.split(".")[0] in ("torch", "monai", "pytorch_metric_learning")
        }
    )
    assert not heavy, heavy


@pytest.mark.parametrize("room", ROOMS)
def test_no_room_is_named_after_a_verb(room: str) -> None:
    import nodulab

    assert room not in nodulab._API, f"nodulab.{room} would rebind the verb nodulab.{room}"
