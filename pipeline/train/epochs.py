"""Epochs back to back: the next epoch's loader starts before this one ends.

Every epoch has its own plan, so its DataLoader workers are new processes that must fork, open the
stores and read their first mixing window before the first batch exists. Started at the epoch
boundary, that is a stall of the step at every epoch (on the bundled sample's 6-step epochs, about a
tenth of stage two). `epoch_iterators` starts epoch e+1's loader (`build_loader(...)` then `iter`,
which starts its workers) while epoch e's last `ahead` batches are consumed, so its first batches
are ready when the step asks for them. For a moment two sets of workers are alive: the next epoch's
first windows are held beside this epoch's last ones.

    for epoch, batches in epoch_iterators(cfg, first_epoch, last_epoch, rank, world, skip_batches):
        ...consume batches (exactly steps_per_epoch - skip of them for the first epoch)...
"""
from __future__ import annotations

from typing import Iterator

from pipeline.train import loader
from pipeline.train.loader import LoaderConfig

AHEAD = 2  # batches before an epoch's end at which the next epoch's loader starts


def epoch_iterators(cfg: LoaderConfig, first_epoch: int, end_epoch: int, rank: int = 0, world_size: int = 1,
                    skip_batches: int = 0, ahead: int = AHEAD) -> Iterator[tuple[int, Iterator[dict]]]:
    """(epoch, batch iterator) for first_epoch .. end_epoch - 1, each started `ahead` batches early."""
    started: dict[int, Iterator[dict]] = {}

    def start(epoch: int, skip: int = 0) -> Iterator[dict]:
        return iter(loader.build_loader(cfg, epoch, rank, world_size, skip_batches=skip))

    def counted(epoch: int, loader_it: Iterator[dict], total: int) -> Iterator[dict]:
        for i, batch in enumerate(loader_it):
            if i == max(0, total - ahead) and epoch + 1 < end_epoch and epoch + 1 not in started:
                started[epoch + 1] = start(epoch + 1)
            yield batch

    for epoch in range(first_epoch, end_epoch):
        skip = skip_batches if epoch == first_epoch else 0
        loader_it = started.pop(epoch, None)
        if loader_it is None:
            loader_it = start(epoch, skip)
        yield epoch, counted(epoch, loader_it, loader.steps_per_epoch(cfg, world_size) - skip)
