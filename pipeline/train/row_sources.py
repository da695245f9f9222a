"""Where a loader worker's rows come from: one small interface, two implementations.

The loader's workers walk the epoch plan (`pipeline.train.plan`) and, for every row a piece needs,
ask a `RowSource` for it. The loader itself knows nothing of stores or teachers:

- `StoredRows` (cached runs): the target stores' rows of the epoch's stored view (`ShardRows`:
  kept tokens, targets still encoded), and the student's pixels from the store or rendered from
  the tar's image with the stored crop box;
- `FreshViews` (`--source online`): a fresh view per epoch (view id = epoch) rendered for the
  student and, at their own sizes, for each teacher; the teachers run on the training device
  (`pipeline.train.online.OnlineTargets`), not here.

Both are small and picklable: a worker holds a copy. What turns a piece into the batch the loss
reads happens in the training process (`pipeline.train.target_rows.finish_targets` for encoded
targets, `OnlineTargets` for fresh views).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pipeline.train.shard_rows import ShardRows
from pipeline.train.sources import Sources
from pipeline.train.target_rows import EncodedArray


@runtime_checkable
class RowSource(Protocol):
    """What a loader worker asks for each row."""

    reads_tars: bool  # whether rows need the tar's decoded image (False: the store holds the pixels)

    def open_shard(self, k: int, first: int, count: int, epoch: int) -> Any:
        """Per-shard state, built once when a worker's window reaches shard k (None if none)."""

    def row(self, shard: Any, index: int, image, epoch: int) -> dict[str, Any]:
        """Sample `index` as piece entries: `image` uint8 [3, S, S], `view`, and what the source adds."""


@dataclass(frozen=True)
class OnlineViews:
    """The fresh views of an online run: the MIM teacher's view plan and each teacher's input render."""

    seed: int  # view plan seed (the MIM recipe's, as extraction would use)
    scale: tuple[float, float]  # RandomResizedCrop area range
    ratio: tuple[float, float]  # and aspect-ratio range
    hflip: float  # flip probability
    teacher_inputs: tuple[tuple[int, str], ...]  # (size, interpolation) of each teacher's render, distinct

    @staticmethod
    def key(size: int, interpolation: str) -> str:
        """The piece entry of one teacher render (`OnlineTargets` reads it back)."""
        return f"x01_{size}_{interpolation}"


@dataclass(frozen=True)
class StoredRows:
    """Rows of the target stores (cached runs)."""

    cfg: Any  # LoaderConfig
    src: Sources
    arrays: tuple[EncodedArray, ...]  # the targets carried (`shard_rows.encoded_arrays`)
    pixels: bool  # student pixels from the store (`shard_rows.stored_pixels`)

    @property
    def reads_tars(self) -> bool:
        return not self.pixels

    def open_shard(self, k: int, first: int, count: int, epoch: int) -> ShardRows:
        return ShardRows(self.cfg, self.src, self.arrays, k, first, count, epoch, self.pixels)

    def row(self, shard: ShardRows, index: int, image, epoch: int) -> dict[str, Any]:
        from pipeline.data.views import render_uint8

        local = index - shard.first
        view = int(shard.view_of_row[local])
        rec = shard.sample(local, view=view, index=index)  # with stored pixels: patches, placed by `loader`
        if not self.pixels:
            rec["image"] = render_uint8(image, shard.view_box(local), self.cfg.img_size, self.cfg.interpolation)
        rec["view"] = np.int64(view)
        return rec


@dataclass(frozen=True)
class FreshViews:
    """A fresh view of every row each epoch, rendered for the student and for each teacher (online)."""

    cfg: Any  # LoaderConfig
    views: OnlineViews
    reads_tars: bool = True

    def open_shard(self, k: int, first: int, count: int, epoch: int) -> None:
        return None

    def row(self, shard: None, index: int, image, epoch: int) -> dict[str, Any]:
        from pipeline.data.views import ViewPlan, render, render_uint8

        v, cfg = self.views, self.cfg
        plan = ViewPlan(seed=v.seed, views=epoch + 1, size=cfg.img_size, scale=v.scale, ratio=v.ratio, hflip=v.hflip,
                        interpolation=cfg.interpolation)
        box = plan.view(index, epoch, *image.size)  # view id = epoch: a new view every epoch
        rec: dict[str, Any] = {v.key(size, interp): render(image, box, size, interp)
                               for size, interp in v.teacher_inputs}
        rec["image"] = render_uint8(image, box, cfg.img_size, cfg.interpolation)
        rec["view"] = np.int64(epoch)
        return rec
