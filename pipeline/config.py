"""Typed stage configs: defaults, then a YAML section, then CLI flags.

Each stage declares a frozen dataclass whose fields carry their unit and meaning in a comment.
`resolve` builds one from the three layers and rejects unknown keys by name, so a typo in
`params.yaml` is an error rather than a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from pipeline.errors import ConfigError

C = TypeVar("C")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, at any depth.

    Plain YAML keeps the last of two equal keys, so `lr: 1e-3` then `lr: 2e-3` in one section
    would silently run with the second: an error naming both lines makes the user pick one.
    Keys brought in by a merge (`<<: *base`) may be overridden; that is what merges are for.
    """

    source = "YAML"  # what the error names: the file, or the option an inline mapping came from

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader's own error names it below
                    continue
                if first is not key_node.start_mark:
                    raise ConfigError(f"{self.source}: key {key!r} is given twice "
                                      f"({_where(first, key_node.start_mark)}); YAML would keep only the last: "
                                      "remove one")
        return super().construct_mapping(node, deep=deep)


def _where(a: yaml.Mark, b: yaml.Mark) -> str:
    """'lines 2 and 3', or 'line 1, columns 2 and 12' for two keys on one line (an inline mapping)."""
    if a.line != b.line:
        return f"lines {a.line + 1} and {b.line + 1}"
    return f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}"


def load_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load(text)`, except that a duplicated key is a ConfigError naming `source`, the key
    and both places (yaml.YAMLError for text that is not YAML, as safe_load)."""
    loader = _UniqueKeyLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_section(path: str | os.PathLike | None, section: str) -> dict[str, Any]:
    """The `section` mapping of YAML file `path` ({} when no file is given).

    A file given but missing, unparsable, or lacking the section is an error: silently running
    with defaults after a typo in `--config` would hide the user's intent.
    """
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        doc = load_yaml(p.read_text(), str(p)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(doc).__name__}")
    if section not in doc:
        raise ConfigError(f"config file {p} has no '{section}' section (sections: {sorted(doc)})")
    body = doc[section]
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ConfigError(f"section '{section}' of {p} must be a mapping")
    return dict(body)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert YAML/CLI values to the field's declared type (lists to tuples, ints to floats).

    Hand-written rather than dacite/pydantic/OmegaConf: ~60 lines that also accept the CLI's
    comma-separated tuples and yes/no strings and name the key in every error, which those would
    need their own hooks and error translation for (more code, and one more dependency)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            return None
        raise ConfigError(f"config key '{name}' may not be null")
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        for a in non_none:
            try:
                return _coerce(name, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{name}': {value!r} fits none of {non_none}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key '{name}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(name, v, args[0]) for v in value)
        if origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"config key '{name}' needs {len(args)} values, got {list(value)}")
            return tuple(_coerce(name, v, a) for v, a in zip(value, args))
        return tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{name}' must be a mapping, got {value!r}")
        check_mapping(name, value)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{name}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"config key '{name}' must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config key '{name}' must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{name}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{name}' must be a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def check_mapping(name: str, mapping: Mapping) -> None:
    """Refuse what a YAML flow mapping without spaces turns a typo into: `{img_size:32}` parses as
    the key 'img_size:32' with value null, which a model constructor would silently drop."""
    for key, value in mapping.items():
        where = f"'{name}' key {key!r}"
        if ":" in str(key):
            raise ConfigError(f"{where} holds a ':' (YAML needs a space after it: {{img_size: 32}}, "
                              "not {img_size:32})")
        if value is None:
            raise ConfigError(f"{where} has no value (null); write it as {{{key}: VALUE}}")
        if isinstance(value, Mapping):
            check_mapping(f"{name}.{key}", value)


def check_keys(cls: type, layer: Mapping[str, Any] | None, source: str) -> None:
    """Reject keys of `layer` that `cls` does not have, naming the key and where it came from."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in layer or {}:
        if key.replace("-", "_") not in names:
            raise ConfigError(f"unknown key '{key}' in {source} for {cls.__name__}; known keys: {sorted(names)}")


def resolve(cls: type[C], *layers: Mapping[str, Any] | None, source: str = "config") -> C:
    """Build `cls` from its defaults overlaid by each mapping in `layers`, in order.

    Keys with value None in a layer are skipped (click passes None for flags not given).
    Unknown keys are an error naming the key, the source and the known keys.
    """
    hints = typing.get_type_hints(cls)
    merged: dict[str, Any] = {}
    for layer in layers:
        check_keys(cls, layer, source)
        for key, value in (layer or {}).items():
            key = key.replace("-", "_")
            if value is None:
                continue
            merged[key] = _coerce(key, value, hints[key])
    try:
        cfg = cls(**merged)
    except TypeError as e:  # a required field left unset
        raise ConfigError(f"{cls.__name__}: {e}") from None
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def write_resolved(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config next to a stage's outputs, so a run records what it used."""
    from pipeline.urls import atomic_write_bytes

    p = Path(path)
    atomic_write_bytes(str(p), yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())  # a full disk leaves no .tmp
    return p
