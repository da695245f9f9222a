"""End-to-end supervised fine-tuning of a student or teacher on a labeled manifest: test top-1/top-5.

The paper's claims are fine-tuning claims; this is their protocol at small scale (MAE/dBOT style):
- the subject's timm ViT with a fresh linear head on the CLS token (`reset_classifier`);
- AdamW, lr = base_lr x batch / 256 (MAE's rule), weight decay (not on norms, biases, pos/cls
  embeddings), layer-wise lr decay (block i of L gets lr x decay^(L + 1 - i); timm's
  `param_groups_layer_decay`), per-step linear warmup then cosine to 0;
- training views: RandomResizedCrop(scale) at the model's input size (bicubic) + horizontal flip;
  cross-entropy with label smoothing;
- test views: the center view of k-NN / linear probe (`center_view`).
Training streams the manifest's shards (a few shuffled together), so memory does not grow with
the dataset; images are decoded in this process. Everything is seeded (`seed`); on CPU a rerun
gives the same numbers. For ImageNet-scale fine-tuning run timm's own training script on the
exported student (README: "The exported student").
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class FinetuneRecipe:
    epochs: int  # passes over the labeled train manifest
    batch_size: int = 64  # images per step
    base_lr: float = 1e-3  # lr = base_lr x batch_size / 256
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms, biases, pos/cls embeddings)
    layer_decay: float = 0.75  # lr of block i = lr x layer_decay^(depth + 1 - i); 1.0 = off
    warmup_epochs: float = 1.0  # linear warmup, epochs
    crop_scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop area range of the training views
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    crop_pct: float = 0.875  # test center view: shorter side to size / crop_pct, central crop
    seed: int = 0  # head init, view sampling, batch order


MIX_SHARDS = 4  # training shards whose images are shuffled together (memory: that many shards' bytes)


def _epoch_samples(manifest, rng: np.random.Generator):
    """(encoded image, label) pairs of one epoch: shards in a random order, `MIX_SHARDS` at a time
    shuffled together, so memory holds a few shards' bytes whatever the dataset size."""
    from pipeline.data.reading import read_shard_records

    order = rng.permutation(manifest.num_shards)
    for i in range(0, len(order), MIX_SHARDS):
        rows = [r for k in order[i:i + MIX_SHARDS] for r in read_shard_records(manifest, int(k))]
        for j in rng.permutation(len(rows)):
            if rows[j]["label"] < 0:
                raise ConfigError(f"sample {rows[j]['index']} of {manifest.path} has no label")
            yield rows[j]["image"], rows[j]["label"]


def _train_view(augment, data: bytes, max_pixels: int) -> torch.Tensor:
    """`augment` applied to an encoded training image, decoded at its manifest's pixel limit."""
    from pipeline.data.images import crops_allowed, decode_image

    image = decode_image(data, max_pixels=max_pixels)
    with crops_allowed(image):  # RandomResizedCrop may crop more than Pillow's own limit allows
        return augment(image)


def _check_labeled(path: str):
    from pipeline.data.manifest import read_manifest

    manifest = read_manifest(path)
    if not manifest.labeled:
        raise ConfigError(f"{path} is unlabeled; fine-tuning needs a labeled manifest")
    return manifest


def finetune(subject, train_manifest: str, test_manifest: str, recipe: FinetuneRecipe, num_classes: int,
             device: torch.device, progress: bool = False) -> dict:
    """Fine-tune a copy of `subject`'s model (a loaded student or teacher) and test it.

    Returns {"epochs", "top1", "top5", "train_loss" (last epoch's mean), "recipe"}.
    """
    from timm.optim import create_optimizer_v2
    from torchvision import transforms

    from pipeline.device import autocast
    from pipeline.eval.probe import topk_accuracy
    from pipeline.eval.subjects import center_view, img_side, iter_images
    from pipeline.progress import Progress
    from pipeline.train.optim import WarmupCosine

    if not hasattr(subject.model, "reset_classifier"):
        raise ConfigError(f"fine-tuning needs a timm model; {subject.name} is a {type(subject.model).__name__}")
    side = img_side(subject)
    torch.manual_seed(recipe.seed)
    model = copy.deepcopy(subject.model).float()
    model.reset_classifier(num_classes)
    model.requires_grad_(True)
    model.to(device).train()
    mean = torch.tensor(subject.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(subject.std, device=device).view(1, 3, 1, 1)
    train = _check_labeled(train_manifest)
    steps_per_epoch = max(1, train.total // recipe.batch_size)
    lr = recipe.base_lr * recipe.batch_size / 256
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=recipe.weight_decay,
                                    layer_decay=recipe.layer_decay if recipe.layer_decay < 1 else None)
    scheduler = WarmupCosine(optimizer, lr, total_steps=steps_per_epoch * recipe.epochs,
                             warmup_steps=round(recipe.warmup_epochs * steps_per_epoch))
    augment = transforms.Compose([
        transforms.RandomResizedCrop(side, scale=tuple(recipe.crop_scale),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    rng = np.random.default_rng(recipe.seed)
    bar = Progress(recipe.epochs * steps_per_epoch, f"finetune {subject.name}", unit="step", bar=progress)
    mean_loss = float("nan")
    for _ in range(recipe.epochs):
        samples = _epoch_samples(train, rng)
        losses = []
        for _ in range(steps_per_epoch):  # the last partial batch of an epoch is dropped
            batch = [next(samples) for _ in range(recipe.batch_size)]
            x = torch.stack([_train_view(augment, data, train.max_image_pixels) for data, _ in batch]).to(device)
            y = torch.as_tensor([label for _, label in batch], device=device)
            with autocast(device):
                logits = model((x - mean) / std)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
        mean_loss = float(np.mean(losses))
    bar.close()
    model.eval()
    _check_labeled(test_manifest)
    scores, labels, views = [], [], []

    def flush():
        with torch.no_grad(), autocast(device):
            scores.append(model((torch.stack(views).to(device) - mean) / std).float().cpu())
        views.clear()

    for image, label, index in iter_images(test_manifest, progress=False):
        if label < 0:
            raise ConfigError(f"sample {index} of {test_manifest} has no label")
        views.append(center_view(image, side, recipe.crop_pct))
        labels.append(label)
        if len(views) == recipe.batch_size:
            flush()
    if views:
        flush()
    acc = topk_accuracy(torch.cat(scores), torch.as_tensor(labels))
    return {"epochs": recipe.epochs, **{f"top{k}": v for k, v in acc.items()}, "train_loss": mean_loss,
            "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.__dict__.items()}}
