"""Which teachers hdpipe knows and how each is fed: names, backends, roles, preprocessing.

Specs: `mae`, `clip`, `deit`, `dino` (table below), `timm:NAME`, `open_clip:NAME[:TAG]` and
`student:DIR` (a stage-two student: DIR/config.json + DIR/model.safetensors). `parse_spec` checks
a name against the libraries' registries without building anything.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError, HdpipeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants, CLIP's training set
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TeacherSpec:
    """What to build and how to feed it."""

    name: str  # canonical spec string recorded in stores, e.g. "mae" or "timm:vit_small_patch16_224"
    backend: str  # "timm" | "open_clip" | "student" (a timm model built from a run's config.json)
    model: str  # timm model name (with .tag) / open_clip config name / student directory
    tag: str | None  # open_clip pretrained tag (timm keeps its tag inside `model`)
    role: str  # "mim" (relations + masks) or "disc" (features) by default for this teacher
    mean: tuple[float, float, float]  # per-channel normalization mean, inputs in [0, 1]
    std: tuple[float, float, float]  # per-channel normalization std
    interpolation: str  # resize filter of this teacher's preprocessing


TEACHERS: dict[str, TeacherSpec] = {
    "mae": TeacherSpec("mae", "timm", "vit_base_patch16_224.mae", None, "mim",
                       IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    # timm's port of OpenAI CLIP ViT-B/16 image tower; QuickGELU as in the original weights.
    "clip": TeacherSpec("clip", "timm", "vit_base_patch16_clip_quickgelu_224.openai", None, "disc",
                        OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, "bicubic"),
    "deit": TeacherSpec("deit", "timm", "deit_base_patch16_224.fb_in1k", None, "disc",
                        IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    "dino": TeacherSpec("dino", "timm", "vit_base_patch16_224.dino", None, "disc",
                        IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
}

SPEC_FORMS = "mae, clip, deit, dino, timm:NAME, open_clip:NAME[:TAG], student:DIR"


def _unknown(spec: str) -> HdpipeError:
    return ConfigError(f"unknown teacher '{spec}': choose one of {SPEC_FORMS}")


def parse_spec(spec: str) -> TeacherSpec:
    """Turn a teacher name or `backend:...` string into a TeacherSpec (preprocessing included)."""
    if spec in TEACHERS:
        return TEACHERS[spec]
    backend, _, rest = spec.partition(":")
    if not rest:
        raise _unknown(spec)
    if backend == "timm":
        import timm

        arch = rest.split(".")[0]
        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch[:12]}*")[:8]
            raise ConfigError(f"teacher '{spec}': timm has no model '{arch}' (similar: {close})")
        tag = rest.split(".", 1)[1] if "." in rest else ""
        if tag and rest not in timm.list_pretrained(f"{arch}.*"):
            raise ConfigError(f"teacher '{spec}': timm model '{arch}' has no pretrained tag '{tag}' "
                              f"(tags: {timm.list_pretrained(f'{arch}.*')})")
        cfg = timm.models.get_pretrained_cfg(rest)
        return TeacherSpec(
            name=spec, backend="timm", model=rest, tag=None,
            # MAE-pretrained encoders are the mask-image-modeling teachers; everything else is
            # discriminative by default (extract's --role overrides either way).
            role="mim" if "mae" in tag else "disc",
            mean=tuple(cfg.mean) if cfg else IMAGENET_MEAN,
            std=tuple(cfg.std) if cfg else IMAGENET_STD,
            interpolation=(cfg.interpolation if cfg and cfg.interpolation else "bicubic"),
        )
    if backend == "open_clip":
        import open_clip

        name, _, tag = rest.partition(":")
        if open_clip.get_model_config(name) is None:
            close = [m for m in open_clip.list_models() if name.split("-")[0].lower() in m.lower()][:8]
            raise ConfigError(f"teacher '{spec}': open_clip has no model config '{name}' (similar: {close})")
        pcfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
        return TeacherSpec(
            name=spec, backend="open_clip", model=name, tag=tag or None, role="disc",
            mean=tuple(pcfg.get("mean", OPENAI_DATASET_MEAN)),
            std=tuple(pcfg.get("std", OPENAI_DATASET_STD)),
            interpolation=pcfg.get("interpolation", "bicubic"),
        )
    if backend == "student":
        return TeacherSpec(name=spec, backend="student", model=rest, tag=None, role="disc",
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")
    raise _unknown(spec)
