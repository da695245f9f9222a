"""Online distillation: both teachers run inside the training step (the baseline hdpipe replaces).

`OnlineTargets` turns a batch of fresh views (`image` for the student, `x01_<size>_<interp>` for
each teacher, from a loader with `online` views: `pipeline.train.row_sources.FreshViews`) into the
batch the cached path reads from its stores: `keep_index`, the MIM target over [CLS] + kept
tokens, `features` over the same tokens. It is the same code extraction runs
(`pipeline.targets.compute`): the same teacher loading, masks and target math; only where the
targets come from differs. Teachers are frozen, in eval mode, under
inference mode, in bf16 autocast on CUDA (`Teacher.forward_targets`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from pipeline.targets.compute import disc_batch, mim_batch
from pipeline.targets.masking import kept_count, random_keep
from pipeline.train.resample import resample_batch
from pipeline.train.row_sources import OnlineViews

if TYPE_CHECKING:
    from pipeline.targets.teachers import Teacher


def input_key(teacher: "Teacher") -> str:
    """The batch key of a teacher's own render of the view (its input size and resize filter)."""
    return OnlineViews.key(teacher.img_size, teacher.interpolation)


@dataclass
class OnlineTargets:
    """Teacher targets for each batch, computed on the training device."""

    mim: "Teacher"  # the MIM teacher: masks always (they come from its hidden states), relations when used
    disc: "Teacher | None"  # the discriminative teacher (None: mim_only)
    relation_layers: tuple[int, ...]  # MIM teacher blocks (1-based) distilled; () = masks only (disc_only)
    mim_target: str  # relations | attention | block_features
    masking: str  # progressive | direct | random | none
    mask_ratio: float  # K of progressive redundant token masking
    seed: int  # random masks: (seed, index, view); token resampling: (seed, epoch, index)
    device: torch.device
    token_resample: float = 1.0  # fraction of the kept tokens shown (pipeline.train.resample; 1 = all)

    def __call__(self, batch: dict) -> dict:
        """Batch of fresh views -> the batch stage two trains on (fresh tensors, usable in backward)."""
        renders = {k: batch.pop(k) for k in [k for k in batch if k.startswith("x01_")]}  # teachers may share one
        xm = renders[input_key(self.mim)].to(self.device)
        xd = renders[input_key(self.disc)].to(self.device) if self.disc is not None else None
        n = xm.shape[0]
        P = self.mim.num_patches
        extras = tuple(t for t in (self.mim_target,) if t != "relations") if self.relation_layers else ()
        tokens = "all" if self.masking == "none" else "kept"
        keep = {"progressive": None, "direct": "direct"}.get(self.masking)
        if self.masking == "random":
            keep = random_keep(batch["index"].tolist(), batch["view"].tolist(), P, kept_count(P, self.mask_ratio),
                               self.seed).to(self.device)
        res = mim_batch(self.mim, self.mim.normalize(xm), self.relation_layers, extras, self.mask_ratio, tokens,
                        keep=keep)
        if self.masking == "none":
            kept = torch.arange(P, device=self.device).expand(n, P)
        elif self.masking in ("progressive", "direct"):
            kept = res[f"keep_{self.masking}"]
        else:
            kept = keep
        batch["keep_index"] = kept.long().clone()
        if self.relation_layers:
            batch[self.mim_target] = res[self.mim_target].float().clone()
        if self.disc is not None:
            feats = disc_batch(self.disc, self.disc.normalize(xd), kept, tokens)["features"]
            batch["features"] = feats.float().clone()
        if self.token_resample < 1:
            # Online views are fresh each epoch and their view id is the epoch (the loader's online plan).
            batch = resample_batch(batch, self.token_resample, self.seed, int(batch["view"][0]))
        return batch

    def attach(self, batches: Iterator[dict]) -> Iterator[dict]:
        """The loader's batches with their teacher targets (computed as each batch is needed)."""
        for batch in batches:
            yield self(batch)


def build_online(mim_ref: str, disc_ref: str | None, *, teachers: str, relation_layers: tuple[int, ...],
                 mim_target: str, masking: str, seed: int, device: torch.device, token_resample: float = 1.0):
    """(TeacherShapes, OnlineTargets, loader settings) of an online run, from the teachers' recipes
    (`FILE:SECTION` params sections, as `hdpipe extract` reads them).

    The shapes are what the teachers give (grid, heads, widths, layers), as a cached run reads them
    from its stores' attributes, so the student is built the same way.
    """
    from pipeline.data.views import VIEW_DEFAULTS
    from pipeline.errors import ConfigError
    from pipeline.run.worker import cached_teacher
    from pipeline.targets.layout import resolve_layers
    from pipeline.targets.recipe import recipe_from_section
    from pipeline.train.sources import TeacherShapes

    mim_recipe = recipe_from_section(mim_ref)
    if mim_recipe.resolved_role() != "mim":
        raise ConfigError(f"online_mim {mim_ref} describes teacher {mim_recipe.teacher}, not a MIM teacher "
                          "(set role: mim in that section)")
    mim = cached_teacher(mim_recipe.source(), device)
    disc = cached_teacher(recipe_from_section(disc_ref).source(), device) if teachers != "mim_only" else None
    if disc is not None and tuple(disc.grid) != tuple(mim.grid):
        raise ConfigError(f"online teachers disagree on the patch grid: {mim.name} {mim.grid} vs "
                          f"{disc.name} {disc.grid}")
    stored = resolve_layers(mim_recipe.relation_layers, mim.depth)
    layers = () if teachers == "disc_only" else (tuple(relation_layers) or stored)
    shapes = TeacherShapes(grid=tuple(mim.grid), relation_layers=layers, mim_depth=mim.depth, mim_heads=mim.num_heads,
                           mim_dim=mim.embed_dim if mim_target == "block_features" else None,
                           feature_dim=None if disc is None else disc.embed_dim)
    online = OnlineTargets(mim, disc, layers, mim_target, masking, mim_recipe.mask_ratio, seed, device,
                           token_resample)
    view = {k: VIEW_DEFAULTS[k] if getattr(mim_recipe, k) is None else getattr(mim_recipe, k)
            for k in ("seed", "scale", "ratio", "hflip")}
    inputs = tuple(sorted({(t.img_size, t.interpolation) for t in (mim, disc) if t is not None}))
    loader = {"online": OnlineViews(seed=view["seed"], scale=tuple(view["scale"]), ratio=tuple(view["ratio"]),
                                    hflip=view["hflip"], teacher_inputs=inputs)}
    return shapes, online, loader
