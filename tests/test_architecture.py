"""The tree keeps the shape docs/ARCHITECTURE.md describes: the layout lists exactly the modules
there are, no stage imports another stage, and every module stays small enough to have one job."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for top in ("pipeline", "stages") for p in (ROOT / top).rglob("*.py")
            if p.name != "__init__.py" or p.parent.name in ("pipeline",)}


def _documented() -> set[str]:
    """Module paths in the layout block of ARCHITECTURE.md (folders nest by indentation)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    found, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        first = line.strip().split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        prefix = "/".join(s[1] for s in stack)
        if first.endswith("/"):
            stack.append((indent, first.rstrip("/")))
            continue
        # a line may list several modules of a folder ("shard.py extract.py ..."), then a comment
        for name in line.strip().split():
            if not name.endswith(".py"):
                break
            found.add(f"{prefix}/{name}" if prefix else name)
    return found


def test_layout_section_lists_exactly_the_modules():
    documented, actual = _documented(), _modules()
    assert documented == actual, (f"in ARCHITECTURE.md, not in the tree: {sorted(documented - actual)}; "
                                  f"in the tree, not in ARCHITECTURE.md: {sorted(actual - documented)}")


def test_no_stage_imports_a_stage():
    for path in (ROOT / "stages").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            assert not [m for m in mods if m.split(".")[0] == "stages"], f"{path.name} imports {mods}"


def test_machinery_never_imports_a_stage():
    """What runs (pipeline/) never depends on an orchestration module (stages/); only the thin CLI
    commands, which wire a stage's config to its function, do."""
    for path in (ROOT / "pipeline").rglob("*.py"):
        if path.parent.name == "commands":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stages":
                raise AssertionError(f"{path.relative_to(ROOT)} imports {node.module}")


def test_every_module_has_at_most_400_lines():
    big = {m: n for m in _modules() if (n := len((ROOT / m).read_text().splitlines())) > 400}
    assert not big, f"modules over 400 lines (split them by job): {big}"
