"""Epochs back to back from one set of loader workers.

Every epoch has its own plan, but not its own workers: `epoch_iterators` builds one
`pipeline.train.loader.RunLoader` for the epochs the run has left, whose DataLoader workers stream
epoch after epoch. A worker that finishes its pieces of epoch e goes straight on to its first
window of e + 1 (at most `prefetch_factor` pieces ahead of the step), so the next epoch's first
batches are ready at the boundary, and nothing is forked, opened or verified again. (Workers that
forked anew for every epoch had to open the stores and read their first window while the step
waited: about a tenth of stage two on the bundled sample's 6-step epochs, hidden before by starting
the next epoch's workers early, which held two sets of workers and windows at once.)

    for epoch, batches in epoch_iterators(cfg, first_epoch, end_epoch, rank, world, skip_batches):
        ...consume batches (exactly steps_per_epoch - skip of them for the first epoch)...
"""
from __future__ import annotations

from typing import Iterator

from pipeline.train import loader
from pipeline.train.loader import LoaderConfig


def epoch_iterators(cfg: LoaderConfig, first_epoch: int, end_epoch: int, rank: int = 0, world_size: int = 1,
                    skip_batches: int = 0) -> Iterator[tuple[int, Iterator[dict]]]:
    """(epoch, batch iterator) for first_epoch .. end_epoch - 1, all served by one set of workers."""
    if first_epoch >= end_epoch:
        return iter(())
    return loader.RunLoader(cfg, first_epoch, end_epoch, rank, world_size, skip_batches).epochs()
