"""The student backend: `student:DIR`, a stage-two export (DIR/config.json + DIR/model.safetensors).

A student is a timm ViT, so it reads like the timm backend; what differs is where its model, kwargs,
preprocessing and weights come from: `config.json` ({model, model_kwargs, mean, std, interpolation},
written by `pipeline.train.checkpoint`) and `model.safetensors` (its "pretrained" weights). The user's
model kwargs override the config's.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from pipeline.errors import HdpipeError
from pipeline.targets.backends.protocol import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, TeacherSpec
from pipeline.targets.backends.timm_backend import TimmBackend, create_timm
from pipeline.targets.weights import KWARGS_OPTION, load_checkpoint, seeded


def student_config(spec: TeacherSpec) -> dict:
    """DIR/config.json of a `student:DIR` spec; an error naming the command that writes it when absent."""
    folder = Path(spec.model)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HdpipeError(f"student '{folder}': no config.json; run `hdpipe distill` to produce "
                          f"runs/<name>/student/ (config.json + model.safetensors)")
    config = json.loads(config_path.read_text())
    if "model" not in config:
        raise HdpipeError(f"student config '{config_path}' has no 'model' key (the timm model name)")
    return config


class StudentBackend(TimmBackend):
    """A run's student: the timm backend's model reading, built from the export's own files."""

    forms = "student:DIR"

    def parse(self, spec: str, rest: str) -> TeacherSpec:
        # Nothing is read here: the folder may be a run that has not been made yet.
        return TeacherSpec(name=spec, backend="student", model=rest, tag=None, role="disc",
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")

    def pretrained(self, spec: TeacherSpec, model_kwargs: dict) -> tuple[nn.Module, str]:
        weights = Path(spec.model) / "model.safetensors"
        model = seeded(lambda: self.create(spec, model_kwargs))
        load_checkpoint(self, model, weights)
        return model, f"checkpoint:{weights.name}"

    def create(self, spec: TeacherSpec, model_kwargs: dict) -> nn.Module:
        config = student_config(spec)
        kwargs = {**config.get("model_kwargs", {}), **model_kwargs}
        # A student's kwargs are its config.json's, overridden by the user's: either may be at fault.
        where = f"{KWARGS_OPTION} or the model_kwargs of {Path(spec.model) / 'config.json'}"
        return create_timm(config["model"], kwargs, pretrained=False, where=where)

    def preprocessing(self, spec: TeacherSpec) -> Preprocessing:
        config = student_config(spec)
        return Preprocessing(tuple(config.get("mean", spec.mean)), tuple(config.get("std", spec.std)),
                             config.get("interpolation", spec.interpolation))
