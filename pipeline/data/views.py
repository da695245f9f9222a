"""View plan: which crop and flip each teacher (and later the student) sees, as a pure function.

A *view* is (sample index, view id). Its RandomResizedCrop box and horizontal flip are drawn from
`numpy.random.default_rng([seed, index, view_id])`, so any process (a dask worker, a training rank,
`hdpipe verify` a week later) rebuilds the exact same view without shared state. The sampling rule
is torchvision's `RandomResizedCrop.get_params` (10 tries, then a center-crop fallback) with numpy in
place of torch's global generator. The store records the normalized box and the flip per view, and
`ViewPlan.digest()` so that a second teacher refuses a store built with another plan.

    plan = ViewPlan(seed=0, views=2, size=224)
    view = plan.view(index=17, view_id=1, width=img.width, height=img.height)
    x01 = render(img, view, plan.size, plan.interpolation)   # float32 [3, 224, 224] in [0, 1]
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.data.images import crops_allowed
from pipeline.errors import ConfigError

# Bump when the sampling or rendering rule changes: stores built with the old rule then refuse the
# new code. 2: images are decoded upright (EXIF orientation applied, `pipeline.data.images`).
ALGORITHM_VERSION = 2

# A MIM extraction's view plan when its config leaves a setting unset (`hdpipe extract`). views 2: in
# the quality study (benchmarks/quality, 8 epochs) one stored view per image cost 0.03-0.05 k-NN top-1
# against 2, 4 or 8 views, which matched online distillation within seed noise; longer schedules
# repeat each view more often (Beyer et al. 2022), so sweep `views_used` before a long run.
VIEW_DEFAULTS = {"views": 2, "seed": 0, "scale": (0.2, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": True}

Interpolation = Literal["bicubic", "bilinear", "nearest", "lanczos"]  # resize filters a view may be rendered with
PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
               "lanczos": Image.LANCZOS}
INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


@dataclass(frozen=True)
class View:
    """One view of one image.

    box: (x0, y0, x1, y1) crop corners as fractions of the image width/height, in [0, 1]; the pixel
         box is recovered exactly by rounding box * (width, height) (see `pixel_box`).
    flip: True when the crop is mirrored left-right after resizing.
    """

    box: tuple[float, float, float, float]
    flip: bool

    def as_row(self) -> np.ndarray:
        """float32 [5] = (x0, y0, x1, y1, flip): the row stored in the `views` array."""
        return np.array([*self.box, float(self.flip)], dtype=np.float32)

    @classmethod
    def from_row(cls, row) -> "View":
        """Inverse of `as_row` (a stored float32 row [5])."""
        values = [float(v) for v in row]
        return cls(box=(values[0], values[1], values[2], values[3]), flip=values[4] >= 0.5)

    def pixel_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width) in pixels, as torchvision's crop functions take them.

        Exact for float32-stored boxes: the pixel coordinates are integers below 2**24.
        """
        x0, y0, x1, y1 = self.box
        left, top = int(round(x0 * width)), int(round(y0 * height))
        right, bottom = int(round(x1 * width)), int(round(y1 * height))
        return top, left, bottom - top, right - left


@dataclass(frozen=True)
class ViewPlan:
    """Parameters of the view plan shared by every teacher and the student."""

    seed: int  # base seed; view (index, view_id) uses default_rng([seed, index, view_id])
    views: int  # views per image (V), view ids 0..V-1
    size: int  # output side in pixels (square), normally the teacher's input size
    scale: tuple[float, float] = (0.2, 1.0)  # crop area as a fraction of the image area (MAE's range)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height) range
    hflip: bool = True  # mirror with probability 0.5 (drawn after the box, from the same generator)
    interpolation: str = "bicubic"  # resize filter: bicubic | bilinear | nearest | lanczos

    def __post_init__(self):
        # Normalize sequences from YAML/JSON into tuples so equality and hashing are by value.
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "ratio", tuple(float(v) for v in self.ratio))
        if self.seed < 0:
            raise ConfigError(f"view plan: seed must be >= 0, got {self.seed}")
        if self.views < 1:
            raise ConfigError(f"view plan: views must be >= 1, got {self.views}")
        if self.size < 1:
            raise ConfigError(f"view plan: size must be >= 1 pixel, got {self.size}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"view plan: scale must be (low, high) with 0 < low <= high <= 1, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"view plan: ratio must be (low, high) with 0 < low <= high, got {self.ratio}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"view plan: interpolation '{self.interpolation}' is not one of {sorted(INTERPOLATIONS)}"
            )

    def view(self, index: int, view_id: int, width: int, height: int) -> View:
        """The crop box and flip of view `view_id` of sample `index` for an image of width x height."""
        if not 0 <= view_id < self.views:
            raise ConfigError(f"view id {view_id} is outside 0..{self.views - 1}")
        rng = np.random.default_rng([self.seed, int(index), int(view_id)])
        top, left, h, w = _rrc_params(rng, width, height, self.scale, self.ratio)
        flip = bool(rng.random() < 0.5) if self.hflip else False
        box = (left / width, top / height, (left + w) / width, (top + h) / height)
        return View(box=box, flip=flip)

    def to_attrs(self) -> dict:
        """JSON-ready dict for the store's attributes (round-trips through `from_attrs`)."""
        attrs = asdict(self)
        attrs["scale"] = list(self.scale)
        attrs["ratio"] = list(self.ratio)
        attrs["algorithm_version"] = ALGORITHM_VERSION
        attrs["digest"] = self.digest()
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict) -> "ViewPlan":
        """Rebuild a plan from `to_attrs()` output; refuses attributes written by another algorithm."""
        version = attrs.get("algorithm_version", ALGORITHM_VERSION)
        if version != ALGORITHM_VERSION:
            raise ConfigError(
                f"view plan was written by algorithm version {version}, this code samples views with "
                f"version {ALGORITHM_VERSION}; re-run extraction with --overwrite"
            )
        fields = ("seed", "views", "size", "scale", "ratio", "hflip", "interpolation")
        plan = cls(**{k: attrs[k] for k in fields})
        if "digest" in attrs and attrs["digest"] != plan.digest():
            raise ConfigError(f"view plan attributes are inconsistent: digest {attrs['digest']} != {plan.digest()}")
        return plan

    def digest(self) -> str:
        """sha256 over the plan's parameters and the sampling algorithm's version."""
        payload = {k: v for k, v in asdict(self).items()}
        payload["scale"] = list(self.scale)
        payload["ratio"] = list(self.ratio)
        payload["algorithm_version"] = ALGORITHM_VERSION
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def _rrc_params(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with a numpy generator: (top, left, h, w) in pixels."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback to a central crop with the aspect ratio clamped into range (torchvision's rule).
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def render_pil(image: Image.Image, view: View, size: int, interpolation: str = "bicubic") -> Image.Image:
    """The view as a size x size RGB PIL image: crop, resize (PIL's antialiased filters, as
    torchvision's transforms use for PIL input during training), flip."""
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation '{interpolation}' is not one of {sorted(INTERPOLATIONS)}")
    if image.mode != "RGB":  # convert() copies even an RGB image: a whole decoded photo per view
        image = image.convert("RGB")
    top, left, h, w = view.pixel_box(image.width, image.height)
    with crops_allowed(image):  # a view may be larger than Pillow's own limit allows a crop to be
        out = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=INTERPOLATIONS[interpolation],
                              antialias=True)
    return TF.hflip(out) if view.flip else out


def render_uint8(image: Image.Image, view: View, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """The view as uint8 [3, size, size]: the pixels of `render` before the division by 255 (a
    quarter of its bytes, for a loader to move and normalize later, in one batched pass)."""
    pixels = np.asarray(render_pil(image, view, size, interpolation))  # [size, size, 3] uint8, read-only
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def render(image: Image.Image, view: View, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Crop, resize to size x size, flip: float32 [3, size, size] in [0, 1], not normalized
    (`render_uint8(...) / 255`, exactly as torchvision's `to_tensor`); each model then normalizes
    with its own mean/std."""
    return TF.to_tensor(render_pil(image, view, size, interpolation))  # uint8 HWC -> float32 CHW / 255
