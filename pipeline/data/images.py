"""Image bytes in and out: the one decoder every stage reads with, and the checks before sharding.

Teachers (extract, verify), the student (stage-two loader) and the probes (evaluate, analyze) must
see the same pixels, so every stage decodes through `decode_image`. A phone photo stores its
pixels sideways plus an EXIF `Orientation` tag; `ImageOps.exif_transpose` turns it upright, as
every photo viewer does. (Before view algorithm version 2, hdpipe ignored the tag.)
"""
from __future__ import annotations

import contextlib
import io
import threading

from PIL import ExifTags, Image, ImageOps

from pipeline.errors import ShardError

# Tar member extensions that hold an image, in the order a sample's image is looked for.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")

# What Pillow raises for damaged, non-image or oversized (decompression bomb) bytes.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# hdpipe's default pixel limit: Pillow's own refusal threshold (2x its MAX_IMAGE_PIXELS, ~179 Mpx);
# any real photo is far below it. `hdpipe shard --max-image-pixels` sets another per dataset.
DEFAULT_MAX_PIXELS = 178_956_970

# Pillow reads its bomb limit from one module global (a warning above it, an error above twice
# it) and takes no limit per call; `_pillow_limit` swaps that global, one call at a time.
_PILLOW_LIMIT_LOCK = threading.Lock()

# Formats whose decoders check no size during `load()` (Pillow checks them once, at open): they
# are decoded without the lock, so threads decode them in parallel (extraction's prefetch does).
_NO_CHECK_AT_LOAD = frozenset({"JPEG", "PNG", "WEBP"})


@contextlib.contextmanager
def _pillow_limit(max_pixels: int | None):
    """Inside the block Pillow refuses images, frames and crops above `max_pixels` (None: its guard off).

    Set per call, not once per process: a dataset's limit then holds in worker processes and
    threads too (each call carries its limit), and nothing else in the process keeps a raised limit.
    """
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        # Pillow errors above 2 * MAX_IMAGE_PIXELS; rounding up keeps max_pixels itself allowed.
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else -(-max_pixels // 2)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(data: bytes) -> Image.Image:
    """`data` opened (header only) with Pillow's own size check off: the caller holds `im.size` to
    its limit. No `with`: closing an image destroys its pixel core; BytesIO holds no OS resource."""
    with _pillow_limit(None):
        return Image.open(io.BytesIO(data))


def _load(im: Image.Image, max_pixels: int) -> None:
    """Decode `im` fully, any frame or tile it decodes held to `max_pixels`."""
    if im.format in _NO_CHECK_AT_LOAD:
        im.load()
        return
    with _pillow_limit(max_pixels):
        im.load()


@contextlib.contextmanager
def crops_allowed(image: Image.Image):
    """Pillow's crop check lets any crop of `image` through inside the block.

    Pillow refuses crops above its own limit (~179 Mpx), so a view of an image the dataset's
    `--max-image-pixels` admitted could fail; `image` was held to that limit when decoded and its
    views are no larger, so the check is off for them. Images within Pillow's default take no lock.
    """
    if image.width * image.height <= DEFAULT_MAX_PIXELS:
        yield
        return
    with _pillow_limit(None):
        yield


def decode_image(data: bytes, what: str = "image", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decoded, upright RGB image from encoded bytes (JPEG, PNG, WebP, ...).

    `what` names the image in the error (e.g. "image 000000017 (cat.jpg) in data/x-000000.tar"):
    damaged bytes raise `ShardError` with Pillow's reason, never a half-decoded image. `max_pixels`
    is the limit the dataset was sharded with (its manifest's `max_image_pixels`): it replaces
    Pillow's own, so every stage accepts exactly the images `hdpipe shard` accepted.
    """
    try:
        im = _open(data)
        w, h = im.size
        if w * h > max_pixels:
            raise ShardError(f"{what} does not decode: {w}x{h} = {w * h} pixels exceeds max_image_pixels={max_pixels}, "
                             "the limit its dataset was sharded with (decompression-bomb guard; if the image is "
                             "genuine, re-shard with a larger --max-image-pixels)")
        _load(im, max_pixels)  # decode fully now: a truncated file fails here, not later inside a resize
        return upright_rgb(im)
    except DECODE_ERRORS as e:
        raise ShardError(f"{what} does not decode ({type(e).__name__}: {e})") from None


def upright_rgb(im: Image.Image) -> Image.Image:
    """`im` rotated/mirrored as its EXIF Orientation tag says, in RGB (no copy when already so)."""
    if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        im = ImageOps.exif_transpose(im)
    return im if im.mode == "RGB" else im.convert("RGB")


# ---- checks and encoding at sharding time ---------------------------------------------------

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

def sniff_format(data: bytes) -> str | None:
    """'jpeg', 'png' or 'webp' from the magic bytes; None for anything else."""
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def check_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` fully and return the loaded image; `ShardError` naming `name` if it is not a
    readable image, is truncated or corrupt, or has more than `max_pixels` pixels.

    The size is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing. This check replaces Pillow's own at open (whose default would refuse, citing its own
    limit, images that `max_pixels` allows); frames and tiles decoded later are held to `max_pixels`.
    """
    try:
        im = _open(data)
    except Exception as e:  # Pillow raises UnidentifiedImageError, SyntaxError, ValueError... by format
        raise ShardError(f"{name}: not an image Pillow can read ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ShardError(f"{name}: {w}x{h} = {w * h} pixels exceeds max_image_pixels={max_pixels} "
                         "(decompression-bomb guard; raise --max-image-pixels if the image is genuine)")
    try:
        _load(im, max_pixels)
    except Image.DecompressionBombError as e:  # a GIF frame or TIFF tile far larger than the header's size
        raise ShardError(f"{name}: a frame or tile is too large for max_image_pixels={max_pixels} "
                         f"(decompression-bomb guard; raise --max-image-pixels if the image is genuine): {e}") from None
    except Exception as e:  # truncated JPEGs raise OSError, broken PNGs SyntaxError/zlib.error, ...
        raise ShardError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    if w < 1 or h < 1:
        raise ShardError(f"{name}: image has no pixels ({w}x{h})")
    return im


def encode_for_shard(data: bytes, name: str, reencode: str = "png", jpeg_quality: int = 95,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """The bytes and tar extension to store for one input image (after checking it decodes).

    JPEG inputs are stored untouched (`.jpg`). Other inputs: with `reencode="png"`, PNG and WebP
    are stored untouched and any other format (BMP, TIFF, GIF, ...) is re-encoded losslessly as PNG
    (first frame); with `reencode="jpeg"`, every non-JPEG input becomes an RGB JPEG at
    `jpeg_quality` (lossy, smaller).
    """
    im = check_image(data, name, max_pixels)
    fmt = sniff_format(data)
    if fmt == "jpeg":
        return data, "jpg"  # its EXIF orientation stays in the bytes; `decode_image` applies it
    if fmt not in ("png", "webp") or reencode == "jpeg":
        # Re-encoding drops EXIF: bake the orientation into the pixels first.
        im = ImageOps.exif_transpose(im) or im
    if reencode == "png":
        if fmt in ("png", "webp"):
            return data, "png" if fmt == "png" else "webp"
        if im.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=False)
        return buf.getvalue(), "png"
    if reencode == "jpeg":
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality, optimize=False)
        return buf.getvalue(), "jpg"
    raise ShardError(f"reencode must be 'png' or 'jpeg', got {reencode!r}")
