"""The one image decoder: stored bytes -> PIL RGB, EXIF orientation applied.

Teachers (extract, verify), the student (stage-two loader) and the probes (evaluate, analyze) must
see the same pixels, so every stage decodes through `decode_image`. A phone photo stores its
pixels sideways plus an EXIF `Orientation` tag; `ImageOps.exif_transpose` turns it upright, as
every photo viewer does. (Before view algorithm version 2, hdpipe ignored the tag.)
"""
from __future__ import annotations

import io

from PIL import ExifTags, Image, ImageOps

from pipeline.errors import ShardError

# What Pillow raises for damaged, non-image or oversized (decompression bomb) bytes.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """Fully decoded, upright RGB image from encoded bytes (JPEG, PNG, WebP, ...).

    `what` names the image in the error (e.g. "image 000000017 (cat.jpg) in data/x-000000.tar"):
    damaged bytes raise `ShardError` with Pillow's reason, never a half-decoded image.
    """
    try:
        # No `with`: closing an image destroys its pixel core; BytesIO holds no OS resource.
        im = Image.open(io.BytesIO(data))
        im.load()  # decode fully now: a truncated file fails here, not later inside a resize
        return upright_rgb(im)
    except DECODE_ERRORS as e:
        raise ShardError(f"{what} does not decode ({type(e).__name__}: {e})") from None


def upright_rgb(im: Image.Image) -> Image.Image:
    """`im` rotated/mirrored as its EXIF Orientation tag says, in RGB (no copy when already so)."""
    if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        im = ImageOps.exif_transpose(im)
    return im if im.mode == "RGB" else im.convert("RGB")
