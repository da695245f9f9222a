"""The student's pixels in a MIM store: each view's student input, rendered once at extraction.

Without them stage two decodes every JPEG, crops, resizes and flips it (`render_uint8`) at every
step. A MIM store made with `--student-pixels` (the default for new stores) holds instead, per
view, the patches of its stored token set exactly as that render gives them:

    student_pixels  uint8 [N, V, K, 3, p, p]   precision exact, lossless (`schema.pixel_compression`)

K: tokens "kept" -> the n_keep patches of `keep_progressive`, in its order (sorted patch ids);
tokens "all" -> every patch, in raster order. p = img_size / grid, the student's patch side.
The student embeds every patch but keeps only the stored tokens, so the other patches never
matter (`pipeline.data.patches.place_patches` puts zeros there). The store's attribute
`student_pixels` is `StudentPixels.to_attrs()`: {img_size, patch_size, interpolation, renderer};
it is absent when the store holds none (older stores, `--no-student-pixels`, and discriminative
stores, whose views and masks are the MIM store's).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from pipeline.data.patches import take_patches
from pipeline.data.views import ALGORITHM_VERSION, INTERPOLATIONS, View, render, render_uint8
from pipeline.errors import ConfigError
from pipeline.targets.schema import ArraySpec

ARRAY = "student_pixels"  # the store array's name (and the store attribute's)
# What made the pixels: a loader rendering from the tars must use the same function to get the same input.
RENDERER = f"pipeline.data.views.render_uint8 v{ALGORITHM_VERSION}"


@dataclass(frozen=True)
class StudentPixels:
    """How a store's student pixels were rendered (its `student_pixels` attribute)."""

    img_size: int  # side of the student's square view in pixels
    patch_size: int  # side of one patch in pixels: img_size / the teacher's grid
    interpolation: str  # resize filter of the views (`pipeline.data.views.INTERPOLATIONS`)
    renderer: str = RENDERER  # the render function and its rule's version

    @classmethod
    def for_grid(cls, img_size: int, interpolation: str, grid: tuple[int, int]) -> "StudentPixels":
        """The pixels of a store whose teacher has a `grid` of patches: one student patch per token."""
        gh, gw = (int(g) for g in grid)
        if img_size < 1 or img_size % gh or img_size % gw or gh != gw:
            near = gh * max(1, round(img_size / gh))
            raise ConfigError(
                f"--student-img-size {img_size} does not split into the teacher's {gh}x{gw} patch grid: the student "
                f"sees one patch per teacher token, so pick a multiple of {gh} (e.g. {near})")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"--student-interpolation {interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        return cls(int(img_size), int(img_size) // gh, str(interpolation))

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "StudentPixels | None":
        """The store's pixels (its `hdpipe` attributes), or None when it holds none."""
        got = attrs.get(ARRAY)
        return None if not got else cls(int(got["img_size"]), int(got["patch_size"]), str(got["interpolation"]),
                                        str(got["renderer"]))

    def spec(self, tokens: int) -> ArraySpec:
        """The array of `tokens` patches per view (n_keep, or every patch)."""
        return ArraySpec((int(tokens), 3, self.patch_size, self.patch_size), "uint8", pixels=True)


def render_views(image, view: View, size: int, interpolation: str,
                 px: StudentPixels | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the teacher's float32 [3, size, size] view in [0, 1], the student's uint8 [3, S, S] view or
    None): one render when both have the same size and filter (`render` is `render_uint8 / 255`)."""
    if px is None:
        return render(image, view, size, interpolation), None
    pixels = render_uint8(image, view, px.img_size, px.interpolation)
    if (px.img_size, px.interpolation) == (size, interpolation):
        return pixels.to(torch.float32).div(255), pixels  # what torchvision's to_tensor computes
    return render(image, view, size, interpolation), pixels


def stored_patches(pixels: torch.Tensor, keep: torch.Tensor, tokens: str, grid: tuple[int, int]) -> torch.Tensor:
    """uint8 [B, K, 3, p, p]: the patches of the stored token set of student views [B, 3, S, S];
    keep long [B, n_keep] (the progressive masks) for tokens "kept", every patch for "all"."""
    if tokens == "all":
        keep = torch.arange(int(grid[0]) * int(grid[1])).expand(pixels.shape[0], -1)
    return take_patches(pixels, keep.cpu(), grid)
