"""Frozen-feature evaluation: weighted k-NN and a linear probe on a labeled train/test split.

    hdpipe shard --sample
    hdpipe evaluate --model student:runs/sample/student
    hdpipe evaluate --model timm:vit_tiny_patch16_224 --random-init \
        --model-kwargs '{"img_size": 64, "patch_size": 8, "depth": 6}' --out reports/evaluate/random.json

Every image of both manifests is rendered as one *center view* at the model's own input size: the
shorter side is resized (PIL, bicubic by default, antialiased) to floor(img_size / crop_pct), then the
central img_size × img_size square is cropped (crop_pct 0.875 = the usual 256 → 224 evaluation crop;
1.0 keeps the whole shorter side). The model normalizes with its own mean/std and its final-layer
tokens (after the final norm) are pooled to one embedding per image: the CLS token or the mean of the
patch tokens. The embeddings feed `pipeline.eval.probe` (k-NN: cosine, weights exp(sim/T); linear probe:
L-BFGS logistic regression on standardized features). The metrics JSON (a DVC metrics file) is
written atomically with the resolved config beside it (`<out>.config.yaml`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import write_resolved
from pipeline.errors import ConfigError, ManifestError
from pipeline.urls import atomic_write_bytes

@dataclass(frozen=True)
class EvaluateConfig:
    # subject: student:DIR (a distill export, e.g. student:runs/sample/student) or any teacher name (mae, clip,
    # timm:NAME, open_clip:NAME[:TAG])
    model: str = ""
    checkpoint: str | None = None  # teacher only: local weights file instead of the hub's pretrained tag
    random_init: bool = False  # teacher only: random weights (a baseline; also what tests use)
    # teacher only: model constructor overrides, e.g. {img_size: 64, patch_size: 8}
    model_kwargs: dict = field(default_factory=dict)
    # teacher only: normalization mean overriding the teacher's config (a teacher trained with its own), RGB 0-1
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None  # teacher only: normalization std overriding the teacher's config
    train_manifest: str = "manifests/sample-probe-train.json"  # labeled manifest the probes are fit on
    test_manifest: str = "manifests/sample-probe-test.json"  # labeled manifest accuracy is measured on
    pooling: Literal["cls", "mean"] = "cls"  # image embedding: the CLS token, or the mean of the patch tokens
    k: int = 20  # k-NN neighbours; more than the train manifest's images is an error
    temperature: float = 0.07  # k-NN vote weight exp(cosine / T), DINO's T
    linear_weight_decay: float = 1e-4  # linear probe L2 strength λ (mean CE + λ/2·‖W‖²)
    linear_max_iter: int = 500  # linear probe L-BFGS iterations (full batch)
    crop_pct: float = 0.875  # center view: resize shorter side to img_size / crop_pct, crop img_size²
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"  # resize filter
    batch_size: int = 64  # images per model forward
    finetune_epochs: int = 0  # end-to-end fine-tuning epochs on train_manifest, tested on test_manifest (0 = off)
    finetune_batch_size: int = 64  # fine-tuning images per step
    finetune_lr: float = 1e-3  # fine-tuning base lr: lr = finetune_lr x finetune_batch_size / 256 (MAE's rule)
    finetune_weight_decay: float = 0.05  # fine-tuning AdamW weight decay
    finetune_layer_decay: float = 0.75  # layer-wise lr decay: block i of L gets lr x decay^(L + 1 - i); 1.0 = off
    finetune_warmup_epochs: float = 1.0  # fine-tuning linear warmup, epochs
    # fine-tuning RandomResizedCrop area range (then a horizontal flip)
    finetune_crop_scale: tuple[float, float] = (0.35, 1.0)
    finetune_label_smoothing: float = 0.1  # fine-tuning cross-entropy label smoothing
    finetune_seed: int = 0  # fine-tuning seed: head init, views, batch order
    device: str = "auto"  # auto (CUDA when present, bf16 autocast), cpu, cuda, cuda:1, ...
    out: str | None = None  # metrics JSON path; default reports/evaluate/<model label>.json
    progress: bool = True  # progress bars on stderr

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("evaluate needs a model: --model student:runs/<name>/student or a teacher "
                              "name such as timm:vit_base_patch16_224 (key 'model' of the evaluate section)")
        if self.model.startswith("student:") and (self.checkpoint or self.random_init or self.model_kwargs
                                                  or self.mean or self.std):
            raise ConfigError("checkpoint / random_init / model_kwargs / mean / std apply to teachers only; a student "
                              f"({self.model}) is loaded from its own config.json and model.safetensors")
        if self.k < 1:
            raise ConfigError(f"evaluate: k must be >= 1, got {self.k}")
        if self.finetune_epochs < 0 or self.finetune_batch_size < 1 or self.finetune_lr <= 0:
            raise ConfigError("evaluate: finetune_epochs >= 0, finetune_batch_size >= 1 and finetune_lr > 0 "
                              "are required")
        if not 0 < self.finetune_layer_decay <= 1:
            raise ConfigError(f"evaluate: finetune_layer_decay must be in (0, 1], got {self.finetune_layer_decay}")
        if self.temperature <= 0:
            raise ConfigError(f"evaluate: temperature must be > 0, got {self.temperature}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"evaluate: crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.batch_size < 1:
            raise ConfigError(f"evaluate: batch_size must be >= 1, got {self.batch_size}")


def evaluate(cfg: EvaluateConfig) -> dict:
    """Embed both splits with the frozen model, run k-NN and the linear probe, write the metrics JSON.

    Returns the metrics dict: {"model", "pooling", "num_classes", "n_train", "n_test",
    "knn": {"k", "temperature", "top1", ["top5"]}, "linear": {"weight_decay", "top1", ["top5"]}, "out"}
    with accuracies as fractions in [0, 1].
    """
    from pipeline.data.manifest import read_manifest
    from pipeline.device import pick_device
    from pipeline.eval.probe import knn_accuracy, linear_probe
    from pipeline.eval.subjects import embed_manifest, load_subject, model_label

    device = pick_device(cfg.device)
    for path in (cfg.train_manifest, cfg.test_manifest):
        m = read_manifest(path)
        if not m.labeled:
            raise ManifestError(f"{path} is unlabeled (class_map null); evaluate needs a labeled split such as "
                                "manifests/sample-probe-train.json (written by hdpipe shard --sample)")
    train = read_manifest(cfg.train_manifest)
    if cfg.k > train.total:
        raise ConfigError(f"evaluate: k={cfg.k} neighbours but {cfg.train_manifest} holds {train.total} reference "
                          f"images; pass --k {train.total} or fewer (or a larger train manifest)")
    num_classes = train.num_classes
    teacher = load_subject(cfg.model, cfg.checkpoint, cfg.random_init, cfg.model_kwargs, device, cfg.mean, cfg.std)
    opts = dict(pooling=cfg.pooling, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                batch_size=cfg.batch_size, progress=cfg.progress)
    xtr, ytr = embed_manifest(teacher, cfg.train_manifest, device, **opts)
    xte, yte = embed_manifest(teacher, cfg.test_manifest, device, **opts)
    num_classes = max(num_classes, int(ytr.max()) + 1, int(yte.max()) + 1)
    knn = knn_accuracy(xtr, ytr, xte, yte, k=cfg.k, temperature=cfg.temperature, num_classes=num_classes)
    lin = linear_probe(xtr, ytr, xte, yte, weight_decay=cfg.linear_weight_decay,
                       max_iter=cfg.linear_max_iter, num_classes=num_classes)
    out = Path(cfg.out) if cfg.out else Path("reports/evaluate") / f"{model_label(cfg.model, cfg.random_init)}.json"
    metrics = {
        "model": cfg.model,
        "random_init": cfg.random_init,
        "pooling": cfg.pooling,
        "num_classes": num_classes,
        "n_train": int(len(ytr)),
        "n_test": int(len(yte)),
        "knn": {"k": cfg.k, "temperature": cfg.temperature, **{f"top{k}": v for k, v in knn.items()}},
        "linear": {"weight_decay": cfg.linear_weight_decay, **{f"top{k}": v for k, v in lin.items()}},
    }
    if cfg.finetune_epochs:
        from pipeline.eval.finetune import FinetuneRecipe, finetune

        recipe = FinetuneRecipe(epochs=cfg.finetune_epochs, batch_size=cfg.finetune_batch_size, base_lr=cfg.finetune_lr,
                                weight_decay=cfg.finetune_weight_decay, layer_decay=cfg.finetune_layer_decay,
                                warmup_epochs=cfg.finetune_warmup_epochs, crop_scale=cfg.finetune_crop_scale,
                                label_smoothing=cfg.finetune_label_smoothing, crop_pct=cfg.crop_pct,
                                seed=cfg.finetune_seed)
        metrics["finetune"] = finetune(teacher, cfg.train_manifest, cfg.test_manifest, recipe, num_classes, device,
                                       progress=cfg.progress)
    atomic_write_bytes(str(out), (json.dumps(metrics, indent=2) + "\n").encode())
    write_resolved(cfg, out.with_name(out.stem + ".config.yaml"))
    metrics["out"] = str(out)
    return metrics

