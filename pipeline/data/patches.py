"""A view's patches and back: the student's pixels stored per token (`pipeline.targets.pixels`).

A square view of side H = gh * p is cut into gh x gw patches of p x p pixels, numbered in raster
order (patch id = row * gw + column), the order of a ViT's patch tokens (patch id i is token i + 1,
after CLS). Both functions are one gather or scatter over the batch, on whatever device the
tensors are (the stage-two loader places patches on the training device):

    patches = take_patches(image, keep_index, grid)    # uint8 [B, 3, H, W] -> [B, K, 3, p, p]
    image = place_patches(patches, keep_index, grid)   # -> [B, 3, gh*p, gw*p], zeros where no patch was given
"""
from __future__ import annotations

import torch

from pipeline.errors import ConfigError


def _patch_side(height: int, width: int, grid: tuple[int, int]) -> int:
    gh, gw = (int(g) for g in grid)
    if height % gh or width % gw or height // gh != width // gw:
        raise ConfigError(f"an image of {height}x{width} pixels does not split into a {gh}x{gw} grid of square patches")
    return height // gh


def take_patches(image: torch.Tensor, keep_index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patches `keep_index` (long [B, K], patch ids) of image [B, 3, H, W] -> [B, K, 3, p, p], in
    the order of `keep_index`; any dtype, on the image's device."""
    b, c, h, w = image.shape
    gh, gw = (int(g) for g in grid)
    p = _patch_side(h, w, grid)
    # [B, C, gh, p, gw, p] -> [B, gh, gw, C, p, p] -> [B, P, C, p, p]: patch id = row * gw + column
    tiles = image.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)
    idx = keep_index.to(device=image.device, dtype=torch.long)
    return tiles[torch.arange(b, device=image.device)[:, None], idx]


def place_patches(patches: torch.Tensor, keep_index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of `take_patches`: patches [B, K, C, p, p] at ids `keep_index` (long [B, K]) of a
    [B, C, gh*p, gw*p] image of the patches' dtype and device, zero at every patch not given."""
    b, k, c, p, p2 = patches.shape
    if p != p2 or tuple(keep_index.shape) != (b, k):
        raise ConfigError(f"place_patches: patches {tuple(patches.shape)} and keep_index {tuple(keep_index.shape)} "
                          "must be [B, K, C, p, p] and [B, K]")
    gh, gw = (int(g) for g in grid)
    tiles = patches.new_zeros((b, gh * gw, c, p, p))
    rows = torch.arange(b, device=patches.device)[:, None]
    tiles[rows, keep_index.to(device=patches.device, dtype=torch.long)] = patches
    return tiles.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * p, gw * p)
