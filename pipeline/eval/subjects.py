"""Evaluation and analysis subjects: a student or teacher loaded frozen, and the images it is shown.

Every image is rendered as one *center view* at the model's own input size (`center_view`): the
shorter side resized (PIL, antialiased) to floor(img_size / crop_pct), then the central
img_size x img_size square cropped (crop_pct 0.875 = the usual 256 -> 224 evaluation crop). The
model normalizes with its own mean/std; `embed_manifest` pools its final-layer tokens (after the
final norm) to one embedding per image: the CLS token or the mean of the patch tokens.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.views import PIL_FILTERS
from pipeline.errors import ConfigError, ManifestError


def model_label(spec: str, random_init: bool = False) -> str:
    """A short file- and legend-friendly name: student:runs/x/student -> student-x, timm:NAME -> NAME."""
    if spec.startswith("student:"):
        p = Path(spec[len("student:"):].rstrip("/"))
        label = f"student-{p.parent.name}" if p.name == "student" and p.parent.name else f"student-{p.name}"
    elif spec.startswith("timm:"):
        label = spec[len("timm:"):]
    else:
        label = spec.replace(":", "-")
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
    return label + ("-random" if random_init else "")


def center_view(image: Image.Image, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic") -> torch.Tensor:
    """Resize the shorter side to floor(size / crop_pct), crop the central size²: float32 [3, size, size] in [0, 1]."""
    image = image.convert("RGB")
    w, h = image.size
    short = math.floor(size / crop_pct)
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), PIL_FILTERS[interpolation])
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.float32) / 255.0  # [size, size, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def img_side(teacher) -> int:
    """The model's square input side in pixels (timm may report img_size as an int or an (h, w) pair)."""
    s = teacher.img_size
    if isinstance(s, (tuple, list)):
        if s[0] != s[1]:
            raise ConfigError(f"only square inputs are supported, model has img_size {tuple(s)}")
        return int(s[0])
    return int(s)


def iter_images(manifest_path: str, limit: int | None = None, progress: bool = True, desc: str = "images"):
    """Yield (upright RGB image, label int (-1 unlabeled), index) in index order over the manifest's
    shards, at most `limit`."""
    from pipeline.data.reading import read_shard_records
    from pipeline.data.images import decode_image
    from pipeline.data.manifest import read_manifest
    from pipeline.progress import Progress

    manifest = read_manifest(manifest_path)
    total = manifest.total if limit is None else min(limit, manifest.total)
    bar = Progress(total, desc, unit="img", bar=progress)
    seen = 0
    try:
        for k in range(manifest.num_shards):
            # Whole shard first (its sha256 is checked at the end of the tar), decoded one by one.
            for rec in read_shard_records(manifest, k):
                if seen >= total:
                    return
                image = decode_image(rec["image"], f"image {rec['index']:09d} ({rec['name']}) of {manifest_path}",
                                     max_pixels=manifest.max_image_pixels)
                yield image, rec["label"], rec["index"]
                seen += 1
                bar.update(1)
    finally:
        bar.close()


def load_subject(spec: str, checkpoint=None, random_init=False, model_kwargs=None, device=None, mean=None, std=None):
    """load_teacher for a student or a teacher; teacher-only options are left out for students
    (a student normalizes as its config.json says: what it was trained with)."""
    from pipeline.targets.teachers import load_teacher

    if spec.startswith("student:"):
        return load_teacher(spec, device=device)
    return load_teacher(spec, checkpoint=checkpoint, random_init=random_init,
                        model_kwargs=dict(model_kwargs or {}) or None, device=device, mean=mean, std=std)


@torch.no_grad()
def embed_manifest(teacher, manifest_path: str, device: torch.device, *, pooling: str = "cls",
                   crop_pct: float = 0.875, interpolation: str = "bicubic", batch_size: int = 64,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled final-layer embeddings [N, D] (float32, on `device`) and labels [N] of every image
    of a labeled manifest."""
    from pipeline.eval.probe import pool_tokens

    side = img_side(teacher)
    feats, labels, batch, batch_labels = [], [], [], []

    def flush():
        x = teacher.normalize(torch.stack(batch))  # [B, 3, S, S] on the model's device
        # Final tokens after the final norm; forward_targets runs bf16 autocast on CUDA and raises
        # NonFiniteError on NaN/Inf.
        tokens = teacher.forward_targets(x, features=True)["features"].float()  # [B, N, D]
        num_prefix = tokens.shape[1] - teacher.grid[0] * teacher.grid[1]
        # a copy, not pool_tokens' view: a view of the CLS token keeps the batch's whole [B, N, D] tokens
        # alive (2.2 KB an image at the scale run's 17 x 32 tokens, ~600 KB at ViT-B's 197 x 768)
        feats.append(pool_tokens(tokens, pooling, num_prefix).clone())
        labels.extend(batch_labels)
        batch.clear()
        batch_labels.clear()

    for image, label, index in iter_images(manifest_path, progress=progress, desc=f"embed {Path(manifest_path).name}"):
        if label < 0:
            raise ManifestError(f"sample {index} of {manifest_path} has no label; evaluate needs labeled "
                                "manifests (hdpipe shard --sample writes manifests/sample-probe-*.json)")
        batch.append(center_view(image, side, crop_pct, interpolation))
        batch_labels.append(int(label))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not feats:
        raise ManifestError(f"manifest {manifest_path} holds no images")
    return torch.cat(feats), torch.tensor(labels, device=device)
