"""The bundled sample dataset: real photographs shipped inside installed packages, no download.

Photos (all bundled in the wheels, loaded offline):
  scikit-image `skimage.data`: astronaut, coffee, chelsea (a cat), rocket, immunohistochemistry,
  hubble_deep_field, retina, camera (grayscale), coins (grayscale), brick / grass / gravel
  (grayscale textures), motorcycle_left (from stereo_motorcycle);
  scikit-learn `load_sample_images()`: china.jpg, flower.jpg.

Each photo is split along its longer side: the first 70% is the *train region*, the last 30% the
*held-out region*. Crops are random boxes (side SIZE_RANGE * a scale in [1, 2.5], aspect ratio in
[3/4, 4/3], clipped to the region) resized with bicubic filtering to a side drawn from SIZE_RANGE
and re-encoded as JPEG at JPEG_QUALITY. Everything is a function of (seed, photo, split, i), so the
sample is byte-identical on every run with the same Pillow/libjpeg.

- `sample` (unlabeled training set): `train_count` crops from the train regions of all photos.
- `sample-probe-train` (labeled, label = photo): `probe_train_per_class` crops per probe photo from
  its train region.
- `sample-probe-test` (labeled): `probe_test_per_class` crops per probe photo from its held-out
  region, so no test pixel is ever seen by the training set or the probe's training split.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from pipeline.data.manifest import read_manifest, verify_shards
from pipeline.data.tars import SampleRecord
from pipeline.errors import HdpipeError
from pipeline.urls import fs_and_path

SAMPLE_VERSION = 1  # bump when the crop algorithm changes: existing samples are then rebuilt
JPEG_QUALITY = 90  # quality of the re-encoded crops (Pillow, 4:2:0 subsampling)
SIZE_RANGE = (96, 192)  # output side of a crop in pixels (uniform integer, inclusive)
SCALE_RANGE = (1.0, 2.5)  # source box side / output side: crops look at several zoom levels
ASPECT_RANGE = (3 / 4, 4 / 3)  # width / height of a crop
TRAIN_FRACTION = 0.7  # share of each photo's longer side used by the training splits


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        if name == "motorcycle_left":
            return skimage.data.stereo_motorcycle()[0]
        return getattr(skimage.data, name)()
    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)
    return load


# (class name, loader, provenance). The first 10 are the probe classes (labels 0..9 in this order).
PHOTOS: tuple[tuple[str, Callable[[], np.ndarray], str], ...] = (
    ("astronaut", _skimage("astronaut"), "skimage.data.astronaut"),
    ("coffee", _skimage("coffee"), "skimage.data.coffee"),
    ("chelsea", _skimage("chelsea"), "skimage.data.chelsea"),
    ("rocket", _skimage("rocket"), "skimage.data.rocket"),
    ("immunohistochemistry", _skimage("immunohistochemistry"), "skimage.data.immunohistochemistry"),
    ("hubble_deep_field", _skimage("hubble_deep_field"), "skimage.data.hubble_deep_field"),
    ("retina", _skimage("retina"), "skimage.data.retina"),
    ("camera", _skimage("camera"), "skimage.data.camera"),
    ("china", _sklearn("china.jpg"), "sklearn.datasets.load_sample_image('china.jpg')"),
    ("flower", _sklearn("flower.jpg"), "sklearn.datasets.load_sample_image('flower.jpg')"),
    ("coins", _skimage("coins"), "skimage.data.coins"),
    ("motorcycle", _skimage("motorcycle_left"), "skimage.data.stereo_motorcycle()[0]"),
    ("brick", _skimage("brick"), "skimage.data.brick"),
    ("grass", _skimage("grass"), "skimage.data.grass"),
    ("gravel", _skimage("gravel"), "skimage.data.gravel"),
)
NUM_PROBE_CLASSES = 10


@dataclass(frozen=True)
class SampleSpec:
    """What the sample builder makes; its `describe()` goes into each manifest's `source`."""

    train_count: int = 512  # unlabeled training crops (sample.json)
    probe_train_per_class: int = 20  # labeled crops per class for the probe's training split
    probe_test_per_class: int = 10  # labeled held-out crops per class
    seed: int = 0  # seeds every crop box and output size

    def describe(self, split: str) -> str:
        import PIL
        import skimage
        import sklearn

        return (f"hdpipe bundled sample v{SAMPLE_VERSION} split={split} train_count={self.train_count} "
                f"probe_train_per_class={self.probe_train_per_class} probe_test_per_class={self.probe_test_per_class} "
                f"seed={self.seed} jpeg_quality={JPEG_QUALITY} size={SIZE_RANGE[0]}-{SIZE_RANGE[1]}px; "
                f"crops of photos bundled with scikit-image {skimage.__version__} and scikit-learn "
                f"{sklearn.__version__} (Pillow {PIL.__version__})")


def _rgb(photo: np.ndarray) -> Image.Image:
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(photo[..., :3]).astype(np.uint8), "RGB")


def _region(w: int, h: int, split: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the train or held-out part of a w x h photo (split on the longer side)."""
    if w >= h:
        cut = int(round(w * TRAIN_FRACTION))
        return (0, 0, cut, h) if split == "train" else (cut, 0, w, h)
    cut = int(round(h * TRAIN_FRACTION))
    return (0, 0, w, cut) if split == "train" else (0, cut, w, h)


def _crop(img: Image.Image, region: tuple[int, int, int, int], rng: np.random.Generator) -> tuple[Image.Image, tuple]:
    """One random crop inside `region`, resized to a random side in SIZE_RANGE."""
    rx0, ry0, rx1, ry1 = region
    rw, rh = rx1 - rx0, ry1 - ry0
    side = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    scale = float(rng.uniform(*SCALE_RANGE))
    aspect = float(np.exp(rng.uniform(np.log(ASPECT_RANGE[0]), np.log(ASPECT_RANGE[1]))))
    area = (side * scale) ** 2
    bw = int(round(min(rw, np.sqrt(area * aspect))))
    bh = int(round(min(rh, np.sqrt(area / aspect))))
    x0 = rx0 + int(rng.integers(0, rw - bw + 1))
    y0 = ry0 + int(rng.integers(0, rh - bh + 1))
    box = (x0, y0, x0 + bw, y0 + bh)
    # The output keeps the box's aspect ratio with its shorter side = `side`.
    short = min(bw, bh)
    ow = max(1, int(round(bw * side / short)))
    oh = max(1, int(round(bh * side / short)))
    return img.crop(box).resize((ow, oh), Image.Resampling.BICUBIC), box


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def _photo(p: int) -> Image.Image:
    """Photo p as RGB, decoded once per process (the builder only crops it, never modifies it)."""
    return _rgb(PHOTOS[p][1]())


def _photos(ids) -> dict[int, Image.Image]:
    return {p: _photo(p) for p in ids}


def iter_split(spec: SampleSpec, split: str) -> Iterator[SampleRecord]:
    """The SampleRecords of one split: "train" (unlabeled), "probe-train" or "probe-test" (labeled).

    Training crops go round-robin over all photos (photo i % P, in PHOTOS order); probe crops go
    class by class (all crops of label 0, then label 1, ...).
    """
    if split == "train":
        photos = _photos(range(len(PHOTOS)))
        plan = [(i % len(PHOTOS), i) for i in range(spec.train_count)]
        region_split, stream, labeled = "train", 0, False
    elif split in ("probe-train", "probe-test"):
        photos = _photos(range(NUM_PROBE_CLASSES))
        per = spec.probe_train_per_class if split == "probe-train" else spec.probe_test_per_class
        plan = [(c, i) for c in range(NUM_PROBE_CLASSES) for i in range(per)]
        region_split = "train" if split == "probe-train" else "heldout"
        stream, labeled = (1 if split == "probe-train" else 2), True
    else:
        raise ValueError(f"unknown sample split {split!r}")
    for p, i in plan:
        name, _, provenance = PHOTOS[p]
        img = photos[p]
        rng = np.random.default_rng([spec.seed, SAMPLE_VERSION, stream, p, i])
        crop, box = _crop(img, _region(*img.size, region_split), rng)
        yield SampleRecord(
            name=f"{name}/{split}-{i:05d}.jpg",
            data=_jpeg(crop),
            ext="jpg",
            label=p if labeled else None,
            source=f"{provenance} crop {box} -> {crop.size[0]}x{crop.size[1]} JPEG q{JPEG_QUALITY}",
        )


def split_sizes(spec: SampleSpec) -> dict[str, int]:
    return {"train": spec.train_count,
            "probe-train": spec.probe_train_per_class * NUM_PROBE_CLASSES,
            "probe-test": spec.probe_test_per_class * NUM_PROBE_CLASSES}


def probe_class_map() -> dict[str, int]:
    return {PHOTOS[p][0]: p for p in range(NUM_PROBE_CLASSES)}


def sample_state(path: str, source: str, shard_size: int) -> str:
    """'absent', 'intact' (this exact sample, tars verified), 'damaged' (this sample's manifest but a
    tar is missing or changed) or 'other' (a different dataset or spec lives there)."""
    fs, p = fs_and_path(path)
    if not fs.exists(p):
        return "absent"
    try:
        m = read_manifest(path)
    except HdpipeError:
        return "other"
    if m.source != source or m.shard_size != shard_size:
        return "other"
    try:
        verify_shards(m, check_hashes=True)
    except HdpipeError:
        return "damaged"
    return "intact"
