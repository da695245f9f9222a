"""Attention and representation properties of one frozen model over a manifest's images.

At every analyzed block l (1-based): attention = softmax(Q·Kᵀ / √d_head) (patch tokens only as
queries and keys, rows renormalized: see `pipeline.eval.analysis`) gives per head the mean attention
distance in pixels of the model's input, NMI and entropy (nats); the block's output tokens (before
any final norm) give the token-level spectrum (per image over its patch tokens, averaged) and the
image-level spectrum (over the images' mean-pooled or CLS embeddings), as relative log singular
values log σ_i − log σ_1.
"""
from __future__ import annotations

import torch

from pipeline.errors import ConfigError


@torch.no_grad()
def analyze_model(teacher, manifest: str, label: str, *, num_images: int = 64, layers: tuple[int, ...] = (),
                  pooling: str = "mean", crop_pct: float = 0.875, interpolation: str = "bicubic",
                  batch_size: int = 16, progress: bool = True) -> dict:
    """All metrics of one loaded model over the manifest's first `num_images` images.

    Returns {"layers": [l...], "attention_distance" / "nmi" / "entropy": [[H] per layer],
    "spectrum_token": [[min(P - 1, D)] per layer], "spectrum_image": [[min(n - 1, D)] per layer], plus
    "depth", "num_heads", "grid", "img_size", "patch_px", "num_prefix", "images"}.
    """
    from pipeline.eval import analysis
    from pipeline.eval.probe import pool_tokens
    from pipeline.eval.subjects import center_view, img_side, iter_images

    depth = int(teacher.depth)
    layers = tuple(sorted(set(layers))) or tuple(range(1, depth + 1))
    if max(layers) > depth:
        raise ConfigError(f"analyze: layer {max(layers)} asked for but {label} has {depth} blocks (option layers)")
    side = img_side(teacher)
    grid = tuple(int(g) for g in teacher.grid)
    patch_px = (side / grid[0], side / grid[1])  # pixels of the model's input per patch (h, w)

    sums: dict[str, list] = {k: [0.0] * len(layers) for k in ("attention_distance", "nmi", "entropy", "spectrum_token")}
    pooled: list[list[torch.Tensor]] = [[] for _ in layers]  # per layer: [B, D] chunks
    n = 0
    num_prefix = None
    batch: list[torch.Tensor] = []

    def flush():
        nonlocal n, num_prefix
        x = teacher.normalize(torch.stack(batch))  # [B, 3, S, S] on the model's device
        # One forward (bf16 autocast on CUDA inside forward_targets; it raises on non-finite values).
        out = teacher.forward_targets(x, attention_layers=layers, block_layers=layers, features=False)
        b = x.shape[0]
        for i, layer in enumerate(layers):
            attn = out["attention"][layer].float()  # [B, H, N, N] softmax(Q·Kᵀ / sqrt(d_head))
            tokens = out["block"][layer].float()  # [B, N, D] output of block `layer`
            num_prefix = attn.shape[-1] - grid[0] * grid[1]
            # Each metric is a mean over the batch; weight by b so the total is a mean over images.
            sums["attention_distance"][i] = (sums["attention_distance"][i]
                                             + b * analysis.attention_distance(attn, grid, patch_px, num_prefix))
            sums["nmi"][i] = sums["nmi"][i] + b * analysis.attention_nmi(attn, num_prefix)
            sums["entropy"][i] = sums["entropy"][i] + b * analysis.attention_entropy(attn, num_prefix)
            sums["spectrum_token"][i] = (sums["spectrum_token"][i]
                                         + b * analysis.singular_spectrum(tokens, "token", num_prefix))
            pooled[i].append(pool_tokens(tokens, pooling, num_prefix))
        n += b
        batch.clear()

    for image, _label, _index in iter_images(manifest, limit=num_images, progress=progress,
                                             desc=f"analyze {label}"):
        batch.append(center_view(image, side, crop_pct, interpolation))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if n < 2:
        raise ConfigError(f"analyze: manifest {manifest} gave {n} image(s); at least 2 are needed")

    result = {
        "spec": None,
        "depth": depth,
        "num_heads": int(teacher.num_heads),
        "grid": list(grid),
        "img_size": side,
        "patch_px": list(patch_px),
        "num_prefix": num_prefix,
        "images": n,
        "layers": list(layers),
    }
    for key, per_layer in sums.items():
        result[key] = [(v / n).cpu().tolist() for v in per_layer]
    result["spectrum_image"] = [
        analysis.singular_spectrum(torch.cat(chunks)[:, None, :], "image", num_prefix=0, pooling="mean").cpu().tolist()
        for chunks in pooled
    ]
    return result
