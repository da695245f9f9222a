"""`hdpipe inspect STORE`: what a target store holds, how big it is, and how exact.

`inspect_store(url, content=False) -> dict` is `store_info(store)` (schema, teacher, counts, shards
done/missing/damaged, bytes per view per array measured on disk, precision and the relative error
against the float32 teacher output recorded in the done markers, provenance); `format_info(info)
-> str` renders it as the table the command prints. Damaged shards are those whose files are
missing or not the length their done marker records (one listing per array); with `content` every
chunk of every done shard is read and its crc32c checked too (`pipeline.targets.integrity`).
"""
from __future__ import annotations

import json
import math
from typing import Any

from pipeline.targets import integrity
from pipeline.targets.quant import codec
from pipeline.targets.schema import part_name, store_parts, stored_parts
from pipeline.targets.store import TargetStore

# Attributes shown in their own rows; every other `hdpipe` attribute is listed under "settings".
_SHOWN = {"schema_version", "teacher", "precision", "codec", "total", "views", "shard_size", "num_shards",
          "arrays", "manifest_digest", "view_plan_digest", "weights_digest", "package_version",
          "code_version", "created", "student_pixels"}


def inspect_store(url: str, content: bool = False) -> dict:
    """Everything known about the store at `url` (StoreError if there is none)."""
    return store_info(TargetStore.open(url), content=content)


def bytes_per_view(store: TargetStore) -> dict[str, float]:
    """{array: bytes on disk per view, "total": sum} over the finished shards (0 when none)."""
    done = sorted(store.done_shards())
    views = sum(store.shard_rows(k)[1] for k in done) * store.views
    out = {}
    for name in sorted(store.arrays):
        b = sum(store.shard_bytes(name, k) for k in done)
        out[name] = b / views if views else 0.0
    out["total"] = float(sum(out.values()))
    return out

def store_level_bytes(store: TargetStore) -> dict[str, int]:
    """{stored part: bytes on disk} of the parts a store keeps once (a q1pct channel basis)."""
    out = {}
    for name, spec in sorted(store.arrays.items()):
        for part in store_parts(spec):
            path = f"{store.path}/{part_name(name, part)}"
            out[part_name(name, part)] = int(store.fs.du(path)) if store.fs.exists(path) else 0
    return out


def damaged_report(store: TargetStore, content: bool = False) -> dict:
    """{"shards": {k: why}, "rebuild": the command that extracts exactly those shards again}."""
    damaged = integrity.damaged_shards(store)
    if content:
        for k in sorted(store.done_shards() - set(damaged)):
            why = integrity.check_content(store, k)
            if why:
                damaged[k] = why
    rebuild = integrity.rebuild_hint(store, sorted(damaged)) if damaged else None
    return {"shards": {int(k): why for k, why in sorted(damaged.items())}, "rebuild": rebuild,
            "content_checked": bool(content)}


def store_info(store: TargetStore, content: bool = False) -> dict:
    """Everything `hdpipe inspect` shows: settings, counts, bytes per view, errors, provenance."""
    done = sorted(store.done_shards())
    markers = [store.done_marker(k) for k in done]
    rows_done = sum(store.shard_rows(k)[1] for k in done)
    bpv = bytes_per_view(store)
    arrays = {}
    for name, spec in sorted(store.arrays.items()):
        entry = {
            "shape": list(((store.total, store.views) if spec.per_view else (store.total,)) + spec.shape_tail),
            "dtype": spec.dtype,
            "precision": spec.precision,
            "stored_parts": {p: d for p, (_, d) in stored_parts(spec).items()},
            "bytes_per_view": bpv[name],
        }
        errs = [m["error"][name] for m in markers if name in m.get("error", {})]
        if errs:
            err2 = sum(e["err_l2"] ** 2 for e in errs)
            ref2 = sum(e["ref_l2"] ** 2 for e in errs)
            entry["relative_error"] = math.sqrt(err2 / ref2) if ref2 > 0 else 0.0
            entry["max_view_relative_error"] = max(e["max_view"] for e in errs)
        arrays[name] = entry
    a = store.attrs
    return {
        "url": store.url,
        "schema_version": a["schema_version"],
        "teacher": a.get("teacher"),
        "precision": store.precision,
        "precision_summary": codec(store.precision).summary,  # what the precision stores, and its error
        "codec": a.get("codec"),
        "samples": store.total,
        "views": store.views,
        "shard_size": store.shard_size,
        "shards": {"total": store.num_shards, "done": len(done), "missing": store.missing_shards()},
        "damaged": damaged_report(store, content),
        "rows_done": rows_done,
        "bytes_per_view": bpv["total"],
        # the student's stored input (`pipeline.targets.pixels`): how it was rendered, what it adds per view
        "student_pixels": ({**a["student_pixels"], "bytes_per_view": bpv.get("student_pixels", 0.0)}
                           if a.get("student_pixels") else None),
        # kept once for the whole store, whatever its size (not in bytes_per_view)
        "store_level_bytes": store_level_bytes(store),
        "arrays": arrays,
        "provenance": {
            "manifest_digest": a.get("manifest_digest"),
            "view_plan_digest": a.get("view_plan_digest"),
            "weights_digest": a.get("weights_digest"),
            "package_version": a.get("package_version"),
            # which code wrote the finished shards (done markers; older stores did not record it)
            "code_version": ", ".join(sorted({str(m["code_version"]) for m in markers if "code_version" in m})) or None,
            "created": a.get("created"),
        },
        "attrs": a,
    }


def _kb(b: float) -> str:
    return f"{b / 1000:.1f} KB" if b >= 1000 else f"{b:.0f} B"


def _err(entry: dict) -> str:
    if "relative_error" not in entry:
        return "exact" if entry["precision"] == "exact" else "-"
    return f"{100 * entry['relative_error']:.3f}% (worst view {100 * entry['max_view_relative_error']:.3f}%)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _damaged(report: dict) -> str:
    checked = ("lengths and crc32c of every chunk" if report["content_checked"]
               else "file lengths; --content reads every chunk")
    if not report["shards"]:
        return f"none ({checked})"
    shown = "; ".join(f"shard {k}: {why}" for k, why in list(report["shards"].items())[:5])
    more = " ..." if len(report["shards"]) > 5 else ""
    return f"{len(report['shards'])} ({shown}{more}); rebuild them with `{report['rebuild']}`"


def format_info(info: dict) -> str:
    """The human-readable report of `inspect_store`."""
    sh = info["shards"]
    missing = sh["missing"]
    shown_missing = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "") if missing else "none"
    attrs: dict[str, Any] = info["attrs"]
    out = [
        f"store          {info['url']}",
        f"schema         {info['schema_version']}",
        f"teacher        {info['teacher']}" + (f" (role {attrs['role']})" if "role" in attrs else ""),
        f"samples        {info['samples']} x {info['views']} view(s); {info['rows_done']} samples in finished shards",
        f"shards         {sh['done']} of {sh['total']} done (shard size {info['shard_size']}); "
        f"missing: {shown_missing}",
        f"damaged        {_damaged(info['damaged'])}",
        f"precision      {info['precision']}: {info['precision_summary']}",
        f"codec          {info['codec']}",
        "",
        "arrays",
    ]
    rows = []
    for name, e in info["arrays"].items():
        stored = ", ".join(f"{p}:{d}" for p, d in e["stored_parts"].items())
        rows.append([name, "x".join(map(str, e["shape"])), e["dtype"], e["precision"], stored,
                     _kb(e["bytes_per_view"]), _err(e)])
    out += _table(["name", "shape", "dtype", "precision", "stored parts", "bytes/view", "rel. error vs fp32"], rows)
    out += ["", f"bytes per view {_kb(info['bytes_per_view'])} (on disk, finished shards)"]
    px = info.get("student_pixels")
    if px:
        out += [f"student pixels {_kb(px['bytes_per_view'])} per view of it: {px['img_size']} px views, "
                f"{px['patch_size']} px patches, {px['interpolation']} ({px['renderer']})"]
    elif attrs.get("role") == "mim":
        out += ["student pixels none (stage two renders the student's views from the tars)"]
    if info["store_level_bytes"]:
        out += ["kept once       " + ", ".join(f"{k} {_kb(v)}" for k, v in info["store_level_bytes"].items())]
    out += ["", "provenance"]
    out += [f"  {k:<17}{'(not recorded)' if v is None else v}" for k, v in info["provenance"].items()]
    settings = {k: v for k, v in attrs.items() if k not in _SHOWN}
    if settings:
        out += ["", "settings"]
        out += [f"  {k:<17}{json.dumps(v, sort_keys=True) if not isinstance(v, str) else v}"
                for k, v in sorted(settings.items())]
    return "\n".join(out)
