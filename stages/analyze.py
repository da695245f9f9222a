"""Property analysis of students and teachers: attention distance, NMI, entropy, singular spectra.

    hdpipe analyze --model student:runs/sample/student --model timm:vit_base_patch16_224.mae
    hdpipe analyze --model timm:vit_tiny_patch16_224 --random-init \
        --model-kwargs '{"img_size": 64, "patch_size": 8, "depth": 6}' --num-images 32

For each model, the first `num_images` images of the manifest are rendered as center views at the
model's input size (the same rule as `hdpipe evaluate`) and run through the frozen model once per
batch. At every analyzed block l (1-based):

- attention = softmax(Q·Kᵀ / √d_head) of block l (the teacher's `attention` output); patch tokens
  only as queries and keys, rows renormalized (CLS/registers dropped: see `pipeline.eval.analysis`);
  per head: mean attention distance in pixels of the model's input, NMI, entropy (nats);
- the block's output tokens (the teacher's `block[l]`, before any final norm) give the token-level
  spectrum (per image over its patch tokens, averaged) and the image-level spectrum (over the
  images' mean-pooled or CLS embeddings), as relative log singular values log σ_i − log σ_1.

Outputs under `out_dir`: `analysis.json` (every number, per model, layer and head), PNG figures
with the models overlaid, and CSV tables for `dvc plots show` (see `pipeline.eval.plots`), plus the
resolved config `analyze.config.yaml`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pipeline.config import write_resolved
from pipeline.errors import ConfigError
from pipeline.urls import atomic_write_bytes


@dataclass(frozen=True)
class AnalyzeConfig:
    # subjects: student:DIR (distill export) and/or teacher names (mae, clip, timm:NAME, open_clip:NAME[:TAG])
    models: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()  # legend names, one per model in order; empty = derived from the specs
    checkpoint: str | None = None  # teacher only: local weights file (allowed with exactly one teacher model)
    random_init: bool = False  # teachers only: random weights (the untrained reference); students keep theirs
    # teachers only: constructor overrides, e.g. {img_size: 64, patch_size: 8}
    model_kwargs: dict = field(default_factory=dict)
    # teachers only: normalization mean overriding the teacher's config (a teacher trained with its own), RGB 0-1
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None  # teachers only: normalization std overriding the teacher's config
    manifest: str = "manifests/sample-probe-test.json"  # images to analyze (labels unused)
    num_images: int = 64  # the first N images of the manifest (all when it holds fewer)
    layers: tuple[int, ...] = ()  # 1-based blocks to analyze; empty = every block 1..L
    pooling: Literal["mean", "cls"] = "mean"  # image-level spectrum embedding: mean of patch tokens or CLS
    crop_pct: float = 0.875  # center view: resize shorter side to img_size / crop_pct, crop img_size²
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"  # resize filter
    batch_size: int = 16  # images per forward (relations of every analyzed layer are held for one batch)
    device: str = "auto"  # auto (CUDA when present, bf16 autocast for the forward), cpu, cuda, cuda:1, ...
    out_dir: str = "reports/analyze"  # analysis.json, PNG figures and DVC CSV tables go here
    progress: bool = True  # progress bars on stderr

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("analyze needs at least one model: --model student:runs/<name>/student and/or "
                              "--model timm:NAME (key 'models' of the analyze section)")
        if self.labels and len(self.labels) != len(self.models):
            raise ConfigError(f"analyze: {len(self.labels)} labels for {len(self.models)} models; "
                              "give one --label per --model")
        teachers = [m for m in self.models if not m.startswith("student:")]
        if self.checkpoint and len(teachers) != 1:
            raise ConfigError(f"analyze: checkpoint needs exactly one teacher model, got {teachers}; "
                              "analyze checkpoints one at a time or export them as students")
        if self.num_images < 2:
            raise ConfigError(f"analyze: num_images must be >= 2 (image-level spectrum), got {self.num_images}")
        if any(layer < 1 for layer in self.layers):
            raise ConfigError(f"analyze: layers are 1-based block numbers, got {list(self.layers)}")
        if self.batch_size < 1:
            raise ConfigError(f"analyze: batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"analyze: crop_pct must be in (0, 1], got {self.crop_pct}")


def analyze(cfg: AnalyzeConfig) -> dict:
    """Analyze every model of `cfg`, write analysis.json, figures and DVC tables under cfg.out_dir.

    Returns {"manifest", "num_images", "models": {label: per-model dict (see analyze_model)},
    "out_dir", "files": {artifact: path}}.
    """
    from pipeline.eval import plots
    from pipeline.device import pick_device
    from pipeline.eval.properties import analyze_model
    from pipeline.eval.subjects import load_subject, model_label

    device = pick_device(cfg.device)
    labels = list(cfg.labels) or [model_label(m, cfg.random_init and not m.startswith("student:")) for m in cfg.models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"analyze: models have duplicate labels {labels}; give distinct --label values")
    models: dict[str, dict] = {}
    for spec, label in zip(cfg.models, labels):
        print(f"hdpipe analyze: {label} ({spec})", file=sys.stderr)
        teacher = load_subject(spec, cfg.checkpoint, cfg.random_init, cfg.model_kwargs, device, cfg.mean, cfg.std)
        res = analyze_model(teacher, cfg.manifest, label, num_images=cfg.num_images, layers=cfg.layers,
                            pooling=cfg.pooling, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                            batch_size=cfg.batch_size, progress=cfg.progress)
        res["spec"] = spec
        res["random_init"] = bool(cfg.random_init and not spec.startswith("student:"))
        models[label] = res
        del teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out_dir = Path(cfg.out_dir)
    files = {k: str(v) for k, v in plots.write_all(models, out_dir).items()}
    doc = {"manifest": cfg.manifest, "num_images": cfg.num_images, "pooling": cfg.pooling, "models": models}
    atomic_write_bytes(str(out_dir / "analysis.json"), (json.dumps(doc, indent=1) + "\n").encode())
    files["analysis_json"] = str(out_dir / "analysis.json")
    files["config"] = str(write_resolved(cfg, out_dir / "analyze.config.yaml"))
    return {**doc, "out_dir": str(out_dir), "files": files}
