"""What every command shares: `--config FILE[:SECTION]`, options made from the stage's config
dataclass, and the merge defaults < file section < flags.

A stage's config is written once: each dataclass field becomes an option with the field's name,
type and default, and the field's comment as its help (`config_options`), so `--help`, params.yaml
and the code cannot disagree.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.config import check_keys, check_mapping, load_section, load_yaml, resolve
from pipeline.errors import ConfigError

config_option = click.option(
    "--config",
    "config_path",
    type=str,
    default=None,
    metavar="FILE[:SECTION]",
    help="YAML params file; the command reads its own section (as in params.yaml), or SECTION when "
    "given (e.g. params.yaml:extract_clip). Flags given on the command line override it.",
)


def split_config_path(config_path: str, default_section: str) -> tuple[str, str]:
    """'params.yaml:extract_mim' -> ('params.yaml', 'extract_mim'); a plain path keeps the command's section.

    Only a suffix after the last ':' that is not itself an existing file counts as a section, so
    paths that contain ':' still work.
    """
    head, sep, tail = config_path.rpartition(":")
    if sep and head and tail and "/" not in tail and not Path(config_path).exists():
        return head, tail
    return config_path, default_section


def build_config(cls: type, config_path: str | None, section: str, flags: dict[str, Any]):
    """Defaults < `section` of `config_path` < flags given on the command line (None = not given)."""
    if config_path is None:
        return resolve(cls, flags, source="command line")
    path, section = split_config_path(config_path, section)
    file_layer = load_section(path, section)
    # Check the file layer alone first so an unknown key is reported against the file by name.
    check_keys(cls, file_layer, source=f"{path} [{section}]")
    return resolve(cls, file_layer, flags, source="command line")


def parse_mapping(ctx: click.Context, param: click.Parameter, value: str | None) -> dict | None:
    """Click callback: a YAML or JSON mapping ('{img_size: 64, patch_size: 8}') -> dict; None when not given."""
    if value is None:
        return None
    option = f"--{param.name.replace('_', '-')}"
    try:
        parsed = load_yaml(value, option)  # a key given twice is an error, not the last one silently
    except yaml.YAMLError as e:
        raise ConfigError(f"{option} is not a YAML/JSON mapping: {e}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{option} must be a mapping like '{{img_size: 64}}', got {value!r}")
    check_mapping(option, parsed)
    return parsed


# ---- options from a config dataclass -----------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment in the class source} (its unit and meaning): the comment on the field's
    line, else the comment lines right above it. Fields of dataclass bases come from their source."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass is not cls:
            out.update(_own_comments(klass))
    return out | _own_comments(cls)


def _own_comments(cls: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = comments.get(node.end_lineno) or comments.get(node.lineno)
        if not text:  # a comment block directly above the field
            above, n = [], node.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            text = " ".join(above)
        out[node.target.id] = text
    return out


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def default_text(value: Any) -> str | None:
    """How a default reads in --help ('0.2,1.0' for tuples, 'on'/'off' for flags); None for None."""
    if value is None or value is dataclasses.MISSING:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip() if value else "{}"
    return str(value)


def _unwrap(tp: Any) -> Any:
    """X for Optional[X] / X | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def config_options(cls: type, *, skip: tuple[str, ...] = (), names: dict[str, str] | None = None,
                   multiple: tuple[str, ...] = ()):
    """Decorator adding one click option per field of `cls` (flags default to None: not given).

    names: field -> option name where it differs (`models` -> `--model`); multiple: fields given as
    a repeatable option (a tuple). Help is the field's comment plus its default. A Literal field is
    a choice of its values; so is a field named in the class's `CHOICES` {field: registry}, a choice
    of the registry's names (`ExtractConfig.precision`: `pipeline.targets.quant.CODECS`).
    """
    names = names or {}
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    choices = getattr(cls, "CHOICES", {})

    def decorate(func):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            flag = names.get(f.name, "--" + f.name.replace("_", "-"))
            tp = _unwrap(hints[f.name])
            shown = default_text(default_of(f))
            help_text = comments.get(f.name, "") + (f"  [default: {shown}]" if shown is not None else "")
            kw: dict[str, Any] = {"default": None, "help": help_text, "show_default": False}
            decls = [flag, f.name]
            if tp is bool:
                decls = [f"{flag}/--no-{flag[2:]}", f.name]
            elif typing.get_origin(tp) is typing.Literal:
                kw["type"] = click.Choice([str(a) for a in typing.get_args(tp)])
            elif f.name in choices:
                kw["type"] = click.Choice([str(a) for a in choices[f.name]])
            elif tp in (int, float):
                kw["type"] = tp
            elif f.name in multiple:
                kw.update(multiple=True, default=())
            elif tp is dict or typing.get_origin(tp) is dict:
                kw.update(callback=parse_mapping, metavar="MAPPING")
            elif typing.get_origin(tp) is tuple:
                kw["metavar"] = "A,B" if Ellipsis not in typing.get_args(tp) else "A,B,..."
            func = click.option(*decls, **kw)(func)
        return func

    return decorate


def given(flags: dict[str, Any]) -> dict[str, Any]:
    """Flags as a config layer: repeatable options left empty count as not given."""
    return {k: (None if v == () else v) for k, v in flags.items()}
