"""Fashion-MNIST (or any idx-format image set) as ImageNet-style class folders, then hdpipe shards.

Debian's `dataset-fashion-mnist` ships the four idx files under /usr/share/datasets/fashion-mnist/.
Images are 28x28 grayscale; they are written as RGB PNGs (three equal channels, lossless) into
`<out>/<split>/<class name>/<index>.png`, so `hdpipe shard --input` labels them from the folders.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a numpy array: magic (0, 0, dtype 0x08 = uint8, ndim), dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte idx file (magic {zero:#x} {dtype:#x})")
        dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(dims)


def load_split(idx_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = FILES[split]
    return read_idx(idx_dir / images), read_idx(idx_dir / labels)


def export_folder(images: np.ndarray, labels: np.ndarray, indices, out: Path) -> Path:
    """Write images[indices] as `out/<class>/<index>.png` (RGB, lossless); returns `out`."""
    from PIL import Image

    for i in indices:
        folder = out / CLASSES[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(images[i][..., None], 3, axis=-1)).save(folder / f"{int(i):05d}.png", optimize=False)
    return out


def write_idx(path: Path, array: np.ndarray) -> None:
    """The inverse of read_idx (gzipped): tests build a tiny idx-format stand-in with it."""
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def synthetic_idx(folder: Path, train: int = 120, test: int = 40, seed: int = 0) -> Path:
    """A tiny idx-format stand-in for Fashion-MNIST: class = a stroke orientation and brightness."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:28, 0:28]
    for split, n in (("train", train), ("test", test)):
        labels = rng.integers(0, len(CLASSES), n).astype(np.uint8)
        angle = labels[:, None, None] * np.pi / len(CLASSES)
        dist = np.abs((xx - 14) * np.sin(angle) - (yy - 14) * np.cos(angle))
        img = (dist < 3) * (120 + 12 * labels[:, None, None]) + rng.normal(0, 12, (n, 28, 28))
        write_idx(folder / FILES[split][0], np.clip(img, 0, 255).astype(np.uint8))
        write_idx(folder / FILES[split][1], labels)
    return folder
