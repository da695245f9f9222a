"""Fix-it commands: the one place that writes "run this" for a target store.

Every command is built from the store's own `hdpipe` attributes, so it reproduces exactly the
settings the store was made with (a resumed extraction must match them field for field), with the
flags a caller asks to change swapped in. Two rules keep hints safe to paste:

- `--overwrite` appears only in hints for the store the failing command itself writes
  (`extract_command(..., overwrite=True)` is for `hdpipe extract` refusing its own output);
- a store some other command made (a MIM store read by a discriminative extraction, the stores
  read by `distill`) is never rebuilt in place: hints that change its settings write a new store
  beside it (`sibling`) and say which option to point at it.
"""
from __future__ import annotations

import json
import shlex
from typing import Any, Mapping


_NEGATABLE = ("hflip", "student_pixels")  # flags whose off must be written (--no-hflip)


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def extract_command(attrs: Mapping[str, Any], *, manifest: str, out: str, overwrite: bool = False,
                    **changes: Any) -> str:
    """`hdpipe extract ...` that (re)makes the store described by `attrs` at `out` from `manifest`.

    `changes` overrides flags by config name (`tokens="all"`, `relation_layers=[1, 2, 3]`,
    `mim_store=URL`, `extra_targets=[...]`); a value of None drops the flag.
    """
    role = attrs.get("role", "mim")
    flags: dict[str, Any] = {"teacher": attrs.get("teacher"), "role": role, "manifest": manifest, "out": out}
    if attrs.get("checkpoint"):
        flags["checkpoint"] = attrs["checkpoint"]
    if attrs.get("random_init"):
        flags["random_init"] = True
    if attrs.get("model_kwargs"):
        flags["model_kwargs"] = dict(attrs["model_kwargs"])
    for key, value in (attrs.get("preprocessing_override") or {}).items():
        if value is not None:
            flags[key] = value
    if role == "mim":
        # Every setting that enters the store's attributes is spelled out (no reliance on today's
        # defaults), so the command resumes this very store or makes its exact sibling.
        plan = attrs.get("view_plan") or {}
        for key in ("views", "seed", "scale", "ratio", "hflip"):
            if key in plan:
                flags[key] = plan[key]
        if attrs.get("relation_layers"):
            flags["relation_layers"] = list(attrs["relation_layers"])
        if attrs.get("extra_targets"):
            flags["extra_targets"] = list(attrs["extra_targets"])
        if "ratio" in (attrs.get("mask") or {}):
            flags["mask_ratio"] = attrs["mask"]["ratio"]
        flags["tokens"] = attrs.get("tokens", "kept")
        pixels = attrs.get("student_pixels")  # absent: made without (older stores, --no-student-pixels)
        flags["student_pixels"] = bool(pixels)
        if pixels:
            flags["student_img_size"] = pixels["img_size"]
            flags["student_interpolation"] = pixels["interpolation"]
    elif attrs.get("mim_store"):
        flags["mim_store"] = attrs["mim_store"]
    if attrs.get("precision"):
        flags["precision"] = attrs["precision"]
    flags.update(changes)
    parts = ["hdpipe extract"]
    for key, value in flags.items():
        if value is None or value is False and key not in _NEGATABLE:
            continue
        flag = "--" + key.replace("_", "-")
        if key in _NEGATABLE:  # off is not their default: spelled out
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {shlex.quote(_fmt(value))}")
    return " ".join(parts + (["--overwrite"] if overwrite else []))


def rebuild_command(attrs: Mapping[str, Any], *, manifest: str, out: str, shards: list[int]) -> str:
    """`hdpipe extract ... --rebuild-shards K,..`: extract exactly these (damaged) shards of the store
    at `out` again, with its own settings; every other done shard is kept."""
    return extract_command(attrs, manifest=manifest, out=out, rebuild_shards=sorted(int(k) for k in shards))
