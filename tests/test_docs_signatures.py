"""docs/ARCHITECTURE.md cannot drift from the code: every call signature it writes in backticks
(`name(a, b=1, *, c=None)`) names a function, method or class of the package whose parameters are
exactly those, in that order, with those defaults where the doc gives one. A span may end its
parameter list with `...` to show only the leading ones (what follows is then not checked)."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
# `name(params)` in backticks, optionally `Class.method(...)` and a return annotation after it.
SPAN = re.compile(r"`((?:[A-Za-z_][A-Za-z0-9_]*\.)?[A-Za-z_][A-Za-z0-9_]*)\(([^`]*)\)(?:\s*->[^`]*)?`")


def _callables() -> dict[str, list]:
    """Every public function, class and method of `pipeline` and `stages`, by its short name."""
    index: dict[str, list] = {}
    for pkg_name in ("pipeline", "stages"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if getattr(obj, "__module__", None) != module.__name__ or name.startswith("__"):
                    continue
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    index.setdefault(name, []).append(obj)
                if inspect.isclass(obj):
                    for attr, member in vars(obj).items():
                        fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                        if inspect.isfunction(fn) and not attr.startswith("__"):
                            index.setdefault(f"{name}.{attr}", []).append(fn)
                            index.setdefault(attr, []).append(fn)
    return index


def _doc_params(text: str) -> tuple[list[tuple[str, str, str | None]], bool] | None:
    """[(name, kind, default source)] of a doc span's parameter list, and whether it ends in `...`;
    None when the span is not Python parameter syntax (an expression such as `f(x)` of values)."""
    partial = text.rstrip().endswith("...")
    body = text.rstrip()[:-3].rstrip().rstrip(",") if partial else text
    try:
        fn = ast.parse(f"def f({body}): pass").body[0]
    except SyntaxError:
        return None
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for arg, default in zip(positional, defaults):
        out.append((arg.arg, "positional", None if default is None else ast.unparse(default)))
    if a.vararg:
        out.append((a.vararg.arg, "*", None))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "keyword", None if default is None else ast.unparse(default)))
    if a.kwarg:
        out.append((a.kwarg.arg, "**", None))
    return out, partial


def _code_params(obj) -> list[tuple[str, str, object]]:
    sig = inspect.signature(obj)
    out = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        kind = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**", p.KEYWORD_ONLY: "keyword"}.get(p.kind, "positional")
        out.append((p.name, kind, p.default))
    return out


def _matches(doc: list, partial: bool, code: list) -> str | None:
    """None when the doc's parameters are the code's; else what differs."""
    if partial:
        code = code[:len(doc)]
    if [(n, k) for n, k, _ in doc] != [(n, k) for n, k, _ in code]:
        return f"parameters {[n for n, _, _ in doc]} vs code {[n for n, _, _ in code]}"
    for (name, _, said), (_, _, default) in zip(doc, code):
        if said is None:
            continue
        if default is inspect.Parameter.empty:
            return f"{name}: the doc gives default {said}, the code has none"
        try:
            value = ast.literal_eval(said)
        except ValueError:
            value = said  # a name (e.g. IMAGENET_MEAN): compare by how the code spells it
            if getattr(default, "__name__", None) == said or repr(default) == said:
                continue
        if value != default and said != repr(default):
            return f"{name}: the doc gives default {said}, the code {default!r}"
    return None


def _spans() -> list[tuple[int, str, str]]:
    out = []
    for lineno, line in enumerate(DOC.read_text().splitlines(), start=1):
        for m in SPAN.finditer(line):
            out.append((lineno, m.group(1), m.group(2)))
    return out


def test_every_signature_the_architecture_page_writes_is_the_codes():
    index = _callables()
    checked, problems = 0, []
    for lineno, name, params in _spans():
        parsed = _doc_params(params)
        if parsed is None or name not in index:
            continue  # not a parameter list, or not one of ours (e.g. `torch.load(...)`, `round(K·n)`)
        doc, partial = parsed
        found = [_matches(doc, partial, _code_params(obj)) for obj in index[name]]
        checked += 1
        if all(f is not None for f in found):
            problems.append(f"ARCHITECTURE.md:{lineno}: `{name}({params})`: {found[0]}")
    assert not problems, "\n".join(problems)
    assert checked >= 20, f"only {checked} signatures found: the pattern stopped matching the page"


@pytest.mark.parametrize("span, ok", [
    ("f(a, b=1, *, c=None)", True), ("f(a, b=2, *, c=None)", False), ("f(a, c=None)", False),
    ("f(a, ...)", True), ("f(b, ...)", False),
])
def test_the_checker_catches_drift(span, ok):
    def f(a, b=1, *, c=None):
        return a

    m = SPAN.search(f"`{span}`")
    doc, partial = _doc_params(m.group(2))
    assert (_matches(doc, partial, _code_params(f)) is None) is ok
