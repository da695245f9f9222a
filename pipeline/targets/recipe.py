"""A teacher's recipe: which teacher, fed how, on which views, computing which targets.

`hdpipe extract` stores what a recipe computes once (its config extends `TeacherRecipe` with
where and how to run); online distillation (`hdpipe distill --source online`) computes the same
at every step, reading the same params sections (`recipe_from_section("params.yaml:extract_mim")`),
so the two paths cannot describe their teachers differently.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pipeline.data.views import VIEW_DEFAULTS, Interpolation
from pipeline.errors import ConfigError
from pipeline.targets.layout import EXTRA_TARGETS

if TYPE_CHECKING:
    from pipeline.data.views import ViewPlan
    from pipeline.targets.teachers import Teacher, TeacherSource


@dataclass(frozen=True)
class TeacherRecipe:
    teacher: str = "mae"  # mae | clip | deit | dino | timm:NAME | open_clip:NAME[:TAG]
    role: Literal["auto", "mim", "disc"] = "auto"  # auto: from the teacher table (mae -> mim, others -> disc)
    checkpoint: str | None = None  # local weights (.pth/.bin/.safetensors) instead of the hub's pretrained tag
    random_init: bool = False  # random weights from a fixed seed (demos and tests only)
    # passed to the model constructor, e.g. {img_size: 64, patch_size: 8}
    model_kwargs: dict = field(default_factory=dict)
    # per-channel normalization mean (RGB, 0-1 scale) overriding the teacher's own config; None: the hub's
    mean: tuple[float, float, float] | None = None
    # per-channel normalization std overriding the teacher's own config; None: the hub's
    std: tuple[float, float, float] | None = None
    # resize filter of the teacher's views overriding its own config; None: the hub's
    interpolation: Interpolation | None = None
    # View plan (MIM teachers; None = VIEW_DEFAULTS). Discriminative teachers take the MIM store's
    # plan: left None they inherit it, and a value that differs from it is an error.
    views: int | None = None  # views (crops) per image, V; MIM default 2 (VIEW_DEFAULTS)
    # view-plan seed: crop box and flip of view (index, v) come from rng([seed, index, v]); MIM default 0
    seed: int | None = None
    # RandomResizedCrop area range, fraction of the image; MIM default (0.2, 1.0), MAE's
    scale: tuple[float, float] | None = None
    # RandomResizedCrop aspect-ratio range (width/height); MIM default (3/4, 4/3)
    ratio: tuple[float, float] | None = None
    hflip: bool | None = None  # horizontal flip with p=0.5 per view; MIM default true
    # 1-based blocks; values <= 0 count back from the last block L (0 = L, -1 = L-1), so the default is (L-2, L-1) =
    # (10, 11) for L = 12
    relation_layers: tuple[int, ...] = (-2, -1)
    # MIM only: any of attention (softmax(R·d^-0.5) over the token set), block_features (block outputs at relation
    # layers)
    extra_targets: tuple[str, ...] = ()
    mask_ratio: float = 0.3  # K: fraction of kept patch tokens dropped at each of the layers (0, L/3, 2L/3)
    # token set of relations/features: [CLS]+kept or every token; auto = kept for MIM, the MIM store's set for disc
    tokens: Literal["auto", "kept", "all"] = "auto"

    def validate(self) -> None:
        if self.views is not None and self.views < 1:
            raise ConfigError(f"views must be >= 1, got {self.views}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.scale is not None and not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if self.ratio is not None and not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not self.relation_layers:
            raise ConfigError("relation_layers must name at least one block (e.g. -2,-1 for L-2, L-1)")
        if len(set(self.relation_layers)) != len(self.relation_layers):
            raise ConfigError(f"relation_layers has duplicates: {self.relation_layers}")
        for extra in self.extra_targets:
            if extra not in EXTRA_TARGETS:
                raise ConfigError(f"unknown extra target '{extra}'; choices: {', '.join(EXTRA_TARGETS)}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"std must be > 0, got {self.std}")
        if self.random_init and self.checkpoint:
            raise ConfigError("pass either --checkpoint or --random-init, not both")

    def source(self) -> "TeacherSource":
        from pipeline.targets.teachers import TeacherSource

        return TeacherSource(self.teacher, self.checkpoint, self.random_init, dict(self.model_kwargs),
                             self.mean, self.std, self.interpolation)

    def resolved_role(self) -> str:
        """`mim` or `disc`: the recipe's role, or the teacher table's (unknown names fail here)."""
        from pipeline.targets.specs import parse_spec

        return self.role if self.role != "auto" else parse_spec(self.teacher).role

    def view_plan(self, teacher: "Teacher") -> "ViewPlan":
        """The MIM view plan: the recipe's settings, VIEW_DEFAULTS for those left unset, at the teacher's size."""
        from pipeline.data.views import ViewPlan

        def get(key):
            value = getattr(self, key)
            return VIEW_DEFAULTS[key] if value is None else value

        return ViewPlan(seed=get("seed"), views=get("views"), size=teacher.img_size, scale=tuple(get("scale")),
                        ratio=tuple(get("ratio")), hflip=get("hflip"), interpolation=teacher.interpolation)


def recipe_from_section(ref: str) -> TeacherRecipe:
    """The recipe in section SECTION of params file FILE (`FILE:SECTION`, as `--config` takes it):
    its recipe keys, the rest (where extraction writes, how it runs) ignored."""
    from pipeline.config import load_section, resolve

    path, sep, section = ref.rpartition(":")
    if not sep or not path:
        raise ConfigError(f"a teacher recipe is named FILE:SECTION (e.g. params.yaml:extract_mim), got {ref!r}")
    body = load_section(path, section)
    names = {f.name for f in dataclasses.fields(TeacherRecipe)}
    return resolve(TeacherRecipe, {k: v for k, v in body.items() if k.replace("-", "_") in names},
                   source=f"{path} [{section}]")
