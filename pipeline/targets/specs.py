"""Which teachers hdpipe knows: the short names, the backend registry, and `parse_spec`.

Specs: `mae`, `clip`, `deit`, `dino` (the table below: fixed timm specs), and `PREFIX:REST` for every
backend in `BACKENDS` (`timm:NAME`, `open_clip:NAME[:TAG]`, `student:DIR`). `parse_spec` picks the
backend once, by the prefix, and checks the name against its library without building anything; the
prefix becomes the spec's `backend`, the key `load_teacher` builds it with. A new backend is a module in
`pipeline/targets/backends/` (a `TeacherBackend`) plus one line in `BACKENDS`.
"""
from __future__ import annotations

from dataclasses import replace

from pipeline.errors import ConfigError, HdpipeError
from pipeline.targets.backends.open_clip_backend import OpenClipBackend
from pipeline.targets.backends.protocol import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_DATASET_MEAN,
                                                OPENAI_DATASET_STD, TeacherBackend, TeacherSpec)
from pipeline.targets.backends.student_backend import StudentBackend
from pipeline.targets.backends.timm_backend import TimmBackend

# The registry: spec prefix -> backend (`timm:NAME` is BACKENDS["timm"]). Tests enumerate it.
BACKENDS: dict[str, TeacherBackend] = {
    "timm": TimmBackend(),
    "open_clip": OpenClipBackend(),
    "student": StudentBackend(),
}

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


def spec_forms() -> str:
    """Every name and form a teacher may be given as: "mae, clip, deit, dino, timm:NAME, ..."."""
    return ", ".join([*TEACHERS, *(backend.forms for backend in BACKENDS.values())])


def _unknown(spec: str) -> HdpipeError:
    return ConfigError(f"unknown teacher '{spec}': choose one of {spec_forms()}")


def parse_spec(spec: str) -> TeacherSpec:
    """Turn a teacher name or `PREFIX:...` string into a TeacherSpec (preprocessing included)."""
    if spec in TEACHERS:
        return TEACHERS[spec]
    prefix, _, rest = spec.partition(":")
    if not rest or prefix not in BACKENDS:
        raise _unknown(spec)
    return replace(BACKENDS[prefix].parse(spec, rest), backend=prefix)  # the key that builds it


def backend_of(spec: TeacherSpec) -> TeacherBackend:
    """The backend that builds and reads a parsed spec."""
    return BACKENDS[spec.backend]
