"""Each `dvc.yaml` stage lists every project module its command runs, and no teacher stage runs
student code.

A module missing from a stage's deps means an edit to it (a q1pct decode, a view rendering)
leaves DVC's cached result in place: a stale student with exit code 0. The closure is computed
from the source: every `import` / `from ... import` anywhere in a module (function-level imports
included, since the commands import lazily), starting from the `hdpipe` entry point and the
command's module, followed through project files only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def _module_file(name: str) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[Path]:
    """Project files imported anywhere in `path` (package __init__ files of every import included)."""
    out: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
                found = _module_file(".".join(parts[:i]))
                if found is not None:
                    out.add(found)
    return out


def closure(entry: list[Path]) -> set[Path]:
    seen: set[Path] = set()
    todo = list(entry)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path) - seen)
    return seen


def _command_module(cmd: str) -> Path:
    """pipeline/commands/<module>.py of an `hdpipe <command> ...` stage command."""
    import pipeline.cli

    words = cmd.split()
    name = words[words.index("hdpipe") + 1]
    module = {c: m for m, c, _ in pipeline.cli.COMMANDS}[name]
    return ROOT / "pipeline" / "commands" / f"{module}.py"


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


def stage_closure(stage: dict) -> set[Path]:
    return closure([ROOT / "pipeline" / "cli.py", _command_module(stage["cmd"])])


@pytest.mark.parametrize("name", list(_stages()))
def test_every_module_a_stage_runs_is_a_dep(name):
    stage = _stages()[name]
    deps = [d for d in stage["deps"] if "${" not in d]
    missing = sorted(p.relative_to(ROOT).as_posix() for p in stage_closure(stage) if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {name!r} runs {missing} but does not list them in its deps"


@pytest.mark.parametrize("name", ["shard", "extract_mim", "extract_disc"])
def test_teacher_stages_run_no_student_code(name):
    """So an edit to the student, its loss or the stage-two loader never re-runs a teacher."""
    ran = {p.relative_to(ROOT).as_posix() for p in stage_closure(_stages()[name])}
    student_side = sorted(p for p in ran if p.startswith("pipeline/train/") or p == "stages/distill.py")
    assert not student_side, f"{name} imports {student_side}"
    listed = [d for d in _stages()[name]["deps"] if d.startswith(("pipeline/train", "stages/distill"))]
    assert not listed, f"{name} depends on student code {listed}"


def test_the_closure_finds_lazy_imports():
    """The measure itself: a function-level import (how stages import torch-heavy code) is followed."""
    found = {p.relative_to(ROOT).as_posix() for p in closure([ROOT / "pipeline" / "commands" / "distill.py"])}
    assert {"stages/distill.py", "pipeline/train/loader.py", "pipeline/targets/quant.py",
            "pipeline/data/views.py"} <= found
