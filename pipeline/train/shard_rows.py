"""One shard's stored rows for a loader worker: each row's view of this epoch, its kept tokens, its
targets still encoded and, when the store holds them, the student's pixels.

`ShardRows` reads every array a run needs from shard k once (`TargetStore.read_shard_views`, whole
blocks, never one Zarr call per sample), keeping only the epoch's view of every row, still encoded:
a worker holding `mix_shards` shards holds S x (one view's stored bytes) per shard, whatever V is.
Decoding is `pipeline.train.target_rows`' (batched, in the worker or on the training device).

Student pixels (`student_pixels` in a MIM store, written by extraction): the uint8 patches of the
stored token set, rendered as `pipeline.data.views.render_uint8` renders the view. When the run's
student input matches what the store recorded (size, patch size, interpolation), the patches are
placed into a zero image (`pipeline.data.patches.place_patches`, in the worker or on the training
device) instead of decoding the tar's JPEG, cropping and resizing: the student embeds every patch
and then keeps only the kept ones (`pipeline.train.student`), so patches it drops never reach a
token, and the input it sees is bit for bit the rendered one.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import ConfigError, StoreError
from pipeline.train.plan import scheduled_view
from pipeline.train.resample import token_positions, token_subset
from pipeline.train.sources import Sources, open_store
from pipeline.train.target_rows import PATCH_IDS, PATCHES, EncodedArray, StoredRow

PIXELS = "student_pixels"  # the MIM store array of the student's uint8 patches [N, V, K, 3, p, p]


def encoded_arrays(mim_store: str | None, disc_store: str | None, src: Sources) -> tuple[EncodedArray, ...]:
    """The targets a batch carries (in batch key order): the MIM target, then the features."""
    out = []
    if src.mim_array is not None:
        out.append(EncodedArray(src.mim_array, mim_store, src.mim_array, tuple(src.layer_pos)))
    if disc_store is not None:
        out.append(EncodedArray("features", disc_store, "features"))
    return tuple(out)


def stored_pixels(cfg, src: Sources) -> bool:
    """Whether the run's student input comes from the store's pixels (`LoaderConfig.student_pixels`):
    "auto" uses them when the store has them for this student geometry and masking, "render" never,
    "store" always (a ConfigError naming what differs when it cannot)."""
    if cfg.student_pixels == "render" or cfg.online is not None:
        return False
    got = open_store(src.view_store).attrs.get(PIXELS) or None
    patch = cfg.img_size // src.grid[0] if cfg.img_size % src.grid[0] == 0 else None
    want = {"img_size": cfg.img_size, "patch_size": patch, "interpolation": cfg.interpolation}
    why = None
    if got is None:
        why = "it holds none (extracted with --no-student-pixels or before they existed)"
    elif any(got.get(k) != v for k, v in want.items()):
        why = (f"they were rendered for {({k: got.get(k) for k in want})}, this student needs {want} "
               "(extract with --student-img-size / --student-interpolation to match)")
    if why is None:
        return True
    if cfg.student_pixels == "store":
        raise ConfigError(f"student_pixels 'store': cannot use the pixels of {src.view_store}: {why}; "
                          "set student_pixels 'auto' or 'render' to render views from the tars")
    return False


class ShardRows:
    """Shard k's rows for one epoch: views, kept tokens, encoded targets and (optionally) pixels."""

    def __init__(self, cfg, src: Sources, arrays: tuple[EncodedArray, ...], k: int, first: int, count: int,
                 epoch: int, pixels: bool):
        self.cfg, self.src, self.first, self.epoch, self.arrays = cfg, src, first, epoch, arrays
        self.pixels = pixels
        used = cfg.views_used or src.num_views
        self.view_of_row = np.array([scheduled_view(cfg.view_schedule, cfg.seed, epoch, first + r, used)
                                     for r in range(count)], dtype=np.int64)
        # Only the arrays this run reads: each costs one Zarr read per shard.
        view_names = ["views"] + {"progressive": ["keep_progressive"], "direct": ["keep_direct"]}.get(cfg.masking, [])
        view_names += [PIXELS] if pixels else []
        self.parts = {name: (src.view_store, parts) for name, parts in
                      open_store(src.view_store).open_shard_views(k, view_names, self.view_of_row).items()}
        for array in arrays:
            got = open_store(array.store).open_shard_views(k, [array.name], self.view_of_row)
            self.parts[array.key] = (array.store, got[array.name])
        for name, (_, parts) in self.parts.items():
            rows = len(next(iter(parts.values())))
            if rows != count:
                raise StoreError(f"store shard {k} array {name} has {rows} rows, manifest says {count}")

    def _row(self, name: str, local: int) -> np.ndarray:
        """Row `local` of a lossless array (views, masks, pixels): its stored values."""
        url, parts = self.parts[name]
        return open_store(url).decode_rows(name, {p: a[local] for p, a in parts.items()})

    def encoded(self, key: str, local: int) -> dict[str, StoredRow]:
        """Row `local` of target `key`, still encoded and compressed: {part: StoredRow}, decompressed
        into the batch by `target_rows.pack`."""
        return {p: StoredRow(a, local) for p, a in self.parts[key][1].items()}

    def stored_keep(self, local: int, index: int, view: int) -> np.ndarray:
        """int64 [n_keep] (or [P] for masking none) sorted kept patch indices of the stored view."""
        masking = self.cfg.masking
        if masking in ("progressive", "direct"):
            return np.asarray(self._row(f"keep_{masking}", local), dtype=np.int64)
        if masking == "random":
            from pipeline.targets.masking import random_keep

            out = random_keep(np.array([index]), np.array([view]), self.src.num_patches, self.src.n_keep,
                              self.cfg.seed)
            return np.asarray(out, dtype=np.int64).reshape(-1)
        return np.arange(self.src.num_patches, dtype=np.int64)

    def sample(self, local: int, index: int, view: int) -> dict:
        """{"keep_index": int64 [n], "_tok": positions on the stored token axis or None, each
        target's encoded row under its key, and with stored pixels `_patches` uint8 [K, 3, p, p]
        with their patch ids `_patch_ids` [K]}; targets and patches as `StoredRow`s, decompressed when
        the piece is stacked (`target_rows.fill_rows`)."""
        keep = self.stored_keep(local, index, view)
        out = {}
        if self.pixels:
            # A kept-token store serves masking progressive only (`resolve_sources`): its patches are
            # those of keep_progressive; a store of every token holds all P in raster order.
            where = keep if self.src.tokens == "kept" else np.arange(self.src.num_patches, dtype=np.int64)
            (stored,) = self.parts[PIXELS][1].values()  # lossless: its one part is the values
            out[PATCHES] = StoredRow(stored, local)
            out[PATCH_IDS] = torch.from_numpy(where)
        # Token positions inside the stored token axis: a kept-token store is [CLS]+kept already.
        tok = None if self.src.tokens == "kept" else token_positions(keep)
        if self.cfg.token_resample < 1:  # this epoch's subset of the kept tokens (pipeline.train.resample)
            sub = token_subset(self.cfg.seed, self.epoch, index, len(keep), self.cfg.token_resample)
            keep, tok = keep[sub], token_positions(sub) if tok is None else tok[token_positions(sub)]
        out.update({"keep_index": keep, "_tok": tok})
        for array in self.arrays:
            out[array.key] = self.encoded(array.key, local)
        return out

    def view_box(self, local: int):
        from pipeline.data.views import View

        return View.from_row(self._row("views", local))
