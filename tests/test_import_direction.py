"""Data flows one way through the rooms: engine → tasks → operators / llm → compress → kernels →
tree. A module may import its own room and any room below it, never a room above it or a sibling
(operators and llm stand side by side). Imports inside functions count too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVELS = {"engine": 0, "tasks": 1, "operators": 2, "llm": 2, "compress": 3, "kernels": 4, "tree": 5}


def imported_rooms(path: Path) -> set[tuple[str, int]]:
    """(room, line) of every autoprune_ray room a module imports, relative imports resolved."""
    room = path.parent.name
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [room] if node.level else [node.module or ""]
        for name in names:
            parts = name.split(".")
            target = parts[1] if parts[0] == "autoprune_ray" and len(parts) > 1 else parts[0]
            if target in LEVELS:
                found.add((target, node.lineno))
    return found


def violations(path: Path) -> list[str]:
    room = path.parent.name
    bad = []
    for target, line in sorted(imported_rooms(path)):
        upward = LEVELS[target] < LEVELS[room]
        sibling = LEVELS[target] == LEVELS[room] and target != room
        if upward or sibling:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({room} is below it or beside it)")
    return bad


@pytest.mark.parametrize("room", sorted(LEVELS))
def test_no_room_imports_upward(room):
    modules = sorted((ROOT / room).glob("*.py"))
    assert modules, f"room {room} has no modules"
    assert [v for m in modules for v in violations(m)] == []


def test_the_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "kernels" / "bad.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from autoprune_ray.engine import config\n    from . import fused\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert violations(fake) == ["kernels/bad.py:2 imports engine (kernels is below it or beside it)"]
    finally:
        ROOT = saved
