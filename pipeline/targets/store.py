"""TargetStore: teacher targets in a Zarr v3 group at any fsspec URL, one Zarr shard per tar shard.

Layout of a store at URL (N samples, V views per sample, S = manifest shard size):

    URL/zarr.json               group; attribute `hdpipe` describes the store (see below)
    URL/<name>/                 one Zarr array per stored part of each logical array
    URL/done/<k:06d>.json       done marker of shard k, written last (readers trust nothing else)

The arrays, their stored parts, codecs and the `hdpipe` attribute are the schema's
(`pipeline.targets.schema`). Zarr shard k holds rows [k*S, k*S + count_k) exactly like tar shard
k; the last tar shard may be shorter and ends the array, so writing it is still a whole-shard
write. A shard is written by one writer in one assignment per array (zarr has no locking: two
writers on one Zarr shard, or a partial shard write, lose data). `read_shard` / `read_rows` return
lossy arrays decoded to float32. `create` on an existing store with the same attribute dict
resumes it; with a different one it refuses unless `overwrite=True`. `open(url, expect)` compares
fields.

Done marker (JSON): the caller's summary (e.g. `seconds`, `views`, `skipped`) plus, set by the
store (its values win on these keys), `shard`, `first_index`, `rows`, `views_per_sample`,
`files` {file key: bytes} of every file the shard wrote (`pipeline.targets.integrity`: readers
check lengths and crc32c before any row is used), `stored_bytes` {array: bytes on disk for this
shard}, `bytes` (their sum), `seconds_store`, `written`, and, for lossy arrays,
`error` {array: {"relative": ||x_hat-x||/||x|| over the shard, "max_view": worst view,
"err_l2", "ref_l2"}} measured against the float32 input at write time.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
from typing import Any, Iterable, Mapping

import numpy as np
import zarr

from pipeline import __version__
from pipeline.errors import StoreError
from pipeline.targets import integrity, quant, shard_reader, shard_writer
from pipeline.targets.bases import ChannelBases, digest
from pipeline.targets.schema import (SCHEMA_VERSION, ArraySpec, check_input, check_q1pct_codec, create_arrays,
                                     diff, full_attrs, jsonable, part_name, store_parts, stored_parts)
from pipeline.urls import atomic_write_bytes, fs_and_path, is_local_fs

_DONE_RE = re.compile(r"^(\d{6})\.json$")

def _zarr_store(url: str, mode: str):
    """A zarr store object: LocalStore for local paths and file:// URLs, FsspecStore otherwise."""
    fs, path = fs_and_path(url)
    if is_local_fs(fs):
        return zarr.storage.LocalStore(path, read_only=(mode == "r"))
    return zarr.storage.FsspecStore.from_url(url, read_only=(mode == "r"))


class TargetStore:
    """Handle on an existing store; make one with `TargetStore.create`, reopen with `TargetStore.open`."""

    def __init__(self, url: str, group: zarr.Group, mode: str):
        self.url = str(url).rstrip("/")
        self._group = group
        self._mode = mode
        self.fs, self.path = fs_and_path(self.url)
        self.attrs: dict = dict(group.attrs["hdpipe"])
        self.total: int = int(self.attrs["total"])
        self.shard_size: int = int(self.attrs["shard_size"])
        self.num_shards: int = int(self.attrs["num_shards"])
        self.views: int = int(self.attrs["views"])
        self.precision: str = str(self.attrs["precision"])
        self.arrays: dict[str, ArraySpec] = {n: ArraySpec.from_json(d) for n, d in self.attrs["arrays"].items()}
        self._zarr: dict[str, zarr.Array] = {}
        self._part_dtypes = {part_name(n, p): np.dtype(d) for n, s in self.arrays.items()
                             for p, (_, d) in {**stored_parts(s), **store_parts(s)}.items()}
        self.bases = ChannelBases(self)  # q1pct arrays with a channel basis (`pipeline.targets.bases`)

    # --- making and opening ----------------------------------------------------------------------

    @classmethod
    def create(cls, url: str, attrs: Mapping[str, Any], arrays: Mapping[str, ArraySpec], manifest: Any,
               views: int, overwrite: bool = False) -> "TargetStore":
        """Make the store (driver side, before any task), or reopen it to resume.

        An existing store built with the same attributes (all but `created`) is reopened as is and its done
        shards stay done (resume), with or without `overwrite`: re-running the same command must never throw
        finished work away (DVC re-runs a stage with `overwrite: true` after an interruption). One built with
        other settings is refused with every differing field named, unless `overwrite`, which deletes it and
        rebuilds the store empty. The `hdpipe` attribute is written last, so a create that died half-way leaves
        a group without it, which is refused as "not an hdpipe target store" (use overwrite).
        """
        url = str(url).rstrip("/")
        full = full_attrs(attrs, arrays, manifest, views)
        fs, path = fs_and_path(url)
        if fs.exists(path):
            existing = cls._read_attrs(url)
            if existing is not None:
                old = {k: v for k, v in existing.items() if k != "created"}
                diffs = diff(old, {k: v for k, v in full.items() if k != "created"}, "")
                if not diffs:
                    return cls.open(url)
            if existing is not None and not overwrite:
                raise StoreError(
                    f"target store {url} exists with other settings ({'; '.join(diffs)}); pass --overwrite "
                    "to delete and rebuild it, or choose another output"
                )
            if existing is None and not overwrite and fs.isdir(path) and fs.ls(path, detail=False):
                raise StoreError(f"{url} exists and is not an hdpipe target store (or its creation was interrupted); "
                                 "pass --overwrite to replace it, or choose another output")
            if overwrite:
                fs.rm(path, recursive=True)
        try:
            group = zarr.open_group(store=_zarr_store(url, "w"), mode="w")
            for name, spec in arrays.items():
                create_arrays(group, name, spec, full)
            group.attrs["hdpipe"] = full
        except (OSError, PermissionError) as e:
            raise StoreError(f"cannot create target store at {url}: {e}; choose a writable output location") from None
        return cls(url, group, "w")

    @staticmethod
    def _read_attrs(url: str) -> dict | None:
        try:
            group = zarr.open_group(store=_zarr_store(url, "r"), mode="r")
        except (OSError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            return None  # nothing there, or not a Zarr group: the caller decides what that means
        attrs = group.attrs.get("hdpipe")
        return dict(attrs) if attrs is not None else None

    @classmethod
    def open(cls, url: str, expect: Mapping[str, Any] | None = None, mode: str = "r") -> "TargetStore":
        """Open an existing store; `expect` {key: value} must equal the stored `hdpipe` attributes.

        mode "r" opens read-only; `write_shard` reopens for writing on first use, so a task may call
        `open(url)` then `write_shard`.
        """
        url = str(url).rstrip("/")
        try:
            group = zarr.open_group(store=_zarr_store(url, mode), mode=mode)
        except (OSError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
            raise StoreError(f"no target store at {url} ({type(e).__name__}); make it with `hdpipe extract`") from None
        attrs = group.attrs.get("hdpipe")
        if attrs is None:
            raise StoreError(f"{url} is a Zarr group but not an hdpipe target store (no 'hdpipe' attribute)")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"target store {url} has schema_version {attrs.get('schema_version')!r}; this hdpipe "
                f"({__version__}) reads {SCHEMA_VERSION}: re-extract it with `hdpipe extract --overwrite`"
            )
        check_q1pct_codec(dict(attrs), url)
        store = cls(url, group, mode)
        if expect:
            diffs = []
            stored = jsonable(store.attrs)
            for key, value in jsonable(dict(expect)).items():
                if key not in stored:
                    diffs.append(f"{key}: missing in store, expected {value!r}")
                else:
                    diffs.extend(diff(stored[key], value, key))
            if diffs:
                raise StoreError(f"target store {url} was built with other settings: {'; '.join(diffs)}")
        return store

    # --- shards ------------------------------------------------------------------------------------

    def shard_rows(self, k: int) -> tuple[int, int]:
        """(first_index, count) of shard k."""
        if not 0 <= int(k) < self.num_shards:
            raise StoreError(f"shard {k} out of range: store {self.url} has shards 0..{self.num_shards - 1}")
        first = int(k) * self.shard_size
        return first, min(self.shard_size, self.total - first)

    def _done_url(self, k: int) -> str:
        return f"{self.url}/done/{int(k):06d}.json"

    def done_shards(self) -> set[int]:
        done_dir = f"{self.path}/done"
        if not self.fs.exists(done_dir):
            return set()
        names = (os.path.basename(p.rstrip("/")) for p in self.fs.ls(done_dir, detail=False))
        return {int(m.group(1)) for m in map(_DONE_RE.match, names) if m and int(m.group(1)) < self.num_shards}

    def missing_shards(self) -> list[int]:
        done = self.done_shards()
        return [k for k in range(self.num_shards) if k not in done]

    def require_complete(self, command_hint: str) -> None:
        missing = self.missing_shards()
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise StoreError(
                f"target store {self.url} is incomplete: {len(missing)} of {self.num_shards} shards not "
                f"finished ({shown}); run `{command_hint}` to finish them"
            )

    def done_marker(self, k: int) -> dict:
        """The done marker of shard k (StoreError when the shard is not finished)."""
        self._require_done(k)
        with self.fs.open(f"{self.path}/done/{int(k):06d}.json", "rb") as f:
            raw = f.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise integrity.damaged(self, k, "done", "its done marker is not JSON") from None

    def invalidate(self, k: int) -> None:
        """Remove shard k's done marker: readers stop trusting it and `extract` writes it again."""
        self.shard_rows(k)
        integrity.remove_files(self, [f"done/{int(k):06d}.json"])

    def _require_done(self, k: int) -> None:
        self.shard_rows(k)
        if not self.fs.exists(f"{self.path}/done/{int(k):06d}.json"):
            raise StoreError(
                f"shard {k} of target store {self.url} is not finished (no done marker); readers never "
                "trust an unfinished shard: run `hdpipe extract` again to finish it"
            )

    def _array(self, name: str) -> zarr.Array:
        if name not in self._zarr:
            arr = self._group[name]
            want = self._part_dtypes[name]
            if arr.dtype != want:
                # Parts written by another encoding of the precision would decode to garbage.
                raise StoreError(
                    f"target store {self.url}: array {name!r} is stored as {arr.dtype}, this hdpipe expects "
                    f"{want} for precision {self.precision!r}; re-extract it with `hdpipe extract --overwrite`"
                )
            self._zarr[name] = arr
        return self._zarr[name]

    def write_shard(self, k: int, arrays: Mapping[str, np.ndarray], summary: Mapping[str, Any] | None = None) -> dict:
        """Write shard k of every array (one whole-shard assignment each), then its done marker.

        arrays: {name: [count_k, V, *shape_tail]} for every array of the store (float targets as
        float32, quantized here, or `quant.Encoded` parts encoded on the teacher's device). Returns
        the done marker written. Rewriting a done shard first removes its marker, so a crash half-way
        never leaves a marker over mixed data.
        """
        t0 = time.perf_counter()
        first, count = self.shard_rows(k)
        names, want = set(arrays), set(self.arrays)
        if names != want:
            raise StoreError(f"shard {k}: arrays missing {sorted(want - names)}, unknown {sorted(names - want)}")
        checked = {n: check_input(self.arrays[n], self.views, k, n, arrays[n], count) for n in sorted(self.arrays)}
        check_q1pct_codec(self.attrs, self.url, writing=True)
        if self._mode == "r":
            self._group = zarr.open_group(store=_zarr_store(self.url, "r+"), mode="r+")
            self._zarr, self._mode = {}, "r+"
        encoded: dict[str, dict[str, np.ndarray]] = {}
        errors: dict[str, dict] = {}
        bases: dict[str, str] = {}
        for name, a in checked.items():
            spec = self.arrays[name]
            if spec.precision == quant.LOSSLESS:
                encoded[name] = {"q": a}
                continue
            view_axes = 2 if spec.per_view else 1
            basis = None
            if spec.uses_channel_basis:
                basis = self.bases.get(name) if self.bases.get(name) is not None else self.bases.fit(k, name, a)
                bases[name] = digest(basis)
            if isinstance(a, quant.Encoded):  # encoded on the teacher's device (`device_encode`), with this basis
                encoded[name], errors[name] = a.parts, a.error()
                continue
            parts = quant.encode(a, spec.precision, view_axes=view_axes, channel_basis=basis)
            errors[name] = quant.error_stats(a, parts, spec.precision, view_axes=view_axes, channel_basis=basis)
            encoded[name] = parts
        self.invalidate(k)
        files = integrity.shard_files(self, k, encoded)
        integrity.remove_files(self, files)  # a whole-shard write still reads an old file's index (maybe damaged)
        for name, parts in encoded.items():
            for part, value in parts.items():  # whole shard objects, encoded and written without Zarr's per-chunk work
                shard_writer.write(self, part_name(name, part), k, value)
        lengths = integrity.file_lengths(self, files)
        stored_bytes = {name: sum(int(b or 0) for key, b in lengths.items() if files[key] == name) for name in encoded}
        marker = {
            **jsonable(dict(summary or {})),
            "shard": int(k),
            "first_index": first,
            "rows": count,
            "views_per_sample": self.views,
            "files": {key: n for key, n in sorted(lengths.items()) if n is not None},
            "stored_bytes": stored_bytes,
            "bytes": int(sum(stored_bytes.values())),
            "error": errors,
            **({"channel_basis_digest": bases} if bases else {}),
            "seconds_store": round(time.perf_counter() - t0, 4),
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_bytes(self._done_url(k), json.dumps(marker, indent=1, sort_keys=True).encode())
        return marker

    def shard_bytes(self, name: str, k: int) -> int:
        """Bytes on disk of Zarr shard k of every part of array `name`."""
        return sum(n or 0 for n in integrity.file_lengths(self, integrity.shard_files(self, k, [name])).values())

    # --- reading -----------------------------------------------------------------------------------

    def _decode(self, name: str, parts: dict[str, np.ndarray]) -> np.ndarray:
        spec = self.arrays[name]
        if spec.precision == quant.LOSSLESS:
            return parts["q"]
        basis = None
        if spec.uses_channel_basis:
            basis = self.bases.get(name)
            if basis is None:  # shards are read only when done, and shard 0 fits the basis first
                raise StoreError(f"target store {self.url}: array {name!r} has no fitted channel basis; re-extract it")
        return quant.decode(parts, spec.precision, basis)

    def _names(self, names: Iterable[str] | None) -> list[str]:
        if names is None:
            return sorted(self.arrays)
        names = list(names)
        unknown = [n for n in names if n not in self.arrays]
        if unknown:
            raise StoreError(f"target store {self.url} has no array(s) {unknown}; it holds {sorted(self.arrays)}")
        return names

    def read_parts(self, k: int, names: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        """{name: {part: [count_k, ...]}}: shard k's stored parts, still encoded, checked on the way."""
        names = self._names(names)
        integrity.verified_marker(self, k, names)
        first, count = self.shard_rows(k)
        out = {}
        for name in names:
            with integrity.reading(self, k, name):
                out[name] = {p: self._array(part_name(name, p))[first : first + count]
                             for p in stored_parts(self.arrays[name])}
        return out

    def read_shard(self, k: int, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """{name: [count_k, V, *tail]} of a finished shard; lossy arrays decoded to float32."""
        return {name: self._decode(name, parts) for name, parts in self.read_parts(k, self._names(names)).items()}

    def read_shard_views(self, k: int, names: Iterable[str], view_of_row: np.ndarray,
                         block: int | None = None) -> dict[str, dict[str, np.ndarray]]:
        """`open_shard_views` as arrays: {name: {part: [count_k, *tail]}}, still encoded."""
        return {n: {p: np.asarray(v) for p, v in parts.items()}
                for n, parts in self.open_shard_views(k, names, view_of_row, block).items()}

    def open_shard_views(self, k: int, names: Iterable[str], view_of_row: np.ndarray,
                         block: int | None = None) -> dict[str, dict[str, shard_reader.RowViews]]:
        """One view per row of a finished shard, still encoded: {name: {part: rows}}, where `rows`
        gives row r with `rows[r]` or `rows.decode_into(r, out)`; decode with `decode_rows`.
        `view_of_row` int [count_k] names the view each row keeps. Per-view arrays only. How they
        are read and checked: `shard_reader.open_shard_views`."""
        return shard_reader.open_shard_views(self, k, self._names(names), view_of_row, block)

    def decode_rows(self, name: str, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        """float32 (lossy arrays) or stored dtype of encoded `parts` of array `name` (any leading selection)."""
        return self._decode(name, dict(parts))

    def read_rows(self, indices: Iterable[int], names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """{name: [len(indices), V, *tail]} for global sample indices (any order) in finished shards."""
        idx = (np.asarray(indices, dtype=np.int64).reshape(-1) if isinstance(indices, np.ndarray)
               else np.fromiter(indices, dtype=np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= self.total):
            raise StoreError(f"sample index out of range [0, {self.total}) for store {self.url}")
        names = self._names(names)
        uniq, inverse = np.unique(idx, return_inverse=True)  # sorted: each shard's rows are one slice of it
        for k in np.unique(uniq // self.shard_size):
            integrity.verified_marker(self, int(k), names)
        if idx.size == 0:
            return {n: np.zeros((0,) + self._row_shape(n), self._out_dtype(n)) for n in names}
        out = {}
        for name in names:
            parts = {p: integrity.read_sorted_rows(self, self._array(part_name(name, p)), name, uniq)[inverse]
                     for p in stored_parts(self.arrays[name])}
            out[name] = self._decode(name, parts)
        return out

    def _row_shape(self, name: str) -> tuple[int, ...]:
        spec = self.arrays[name]
        return ((self.views,) if spec.per_view else ()) + spec.shape_tail

    def _out_dtype(self, name: str) -> np.dtype:
        spec = self.arrays[name]
        return np.dtype(np.float32) if spec.precision != quant.LOSSLESS else np.dtype(spec.dtype)
