"""One source image -> the baseline RGB JPEG a shard stores, or the reason it is skipped.

Every image is decoded, fixed where real ImageNet needs it (CMYK, grayscale, PNG bytes in a
.JPEG file), resized so its longer side is at most `max_side` unless that would bring its shorter
side below `min_side` (what evaluation, 224 / 0.875 = 256 px, and a full-scale 224 crop need), and
re-encoded as baseline RGB JPEG. What is not a readable image of sane size (empty, truncated,
not an image, over --max-pixels) raises BadImageError with the reason the converter records.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image


class BadImageError(ValueError):
    """A source file that cannot be turned into an image (the message is the reason)."""


@dataclass
class Processed:
    jpeg: bytes
    fixes: list[str]
    pixel_sum: np.ndarray  # per channel, over pixels scaled to [0, 1]
    pixel_sq_sum: np.ndarray
    pixels: int


def stored_size(width: int, height: int, max_side: int, min_side: int = 0) -> tuple[int, int] | None:
    """The size an image is stored at (None: as it is): the longer side brought down to
    `max_side`, but never the shorter side below `min_side`; never enlarged."""
    scale = min(1.0, max_side / max(width, height))
    if min(width, height) * scale < min_side:
        scale = min(1.0, min_side / min(width, height))
    if scale >= 1.0:
        return None
    return max(1, round(width * scale)), max(1, round(height * scale))


def process_image(
    data: bytes, max_side: int, quality: int, min_side: int = 0, max_pixels: int = 89_478_485
) -> Processed:
    """Decode, fix, resize and re-encode one source image. Raises BadImageError with the reason."""
    if not data:
        raise BadImageError("empty file")
    fixes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(f"{width}x{height} pixels, over --max-pixels {max_pixels}")
        if image.format != "JPEG":
            fixes.append(f"{(image.format or 'unknown').lower()} re-encoded as JPEG")
        target = stored_size(*image.size, max_side, min_side)
        if target is not None and image.format == "JPEG":
            image.draft(image.mode if image.mode in ("RGB", "L") else None, target)  # DCT-domain downscale
        image.load()
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise BadImageError(f"over the pixel limit ({str(err).split('.')[0]})") from err
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for bad input
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = "truncated file" if "truncated" in message.lower() else f"not a readable image ({message})"
        raise BadImageError(reason) from err
    if image.mode != "RGB":
        kind = {"CMYK": "cmyk", "L": "grayscale", "LA": "grayscale", "I;16": "grayscale"}.get(image.mode, image.mode)
        fixes.append(f"{kind} converted to RGB")
        image = image.convert("RGB")
    if target is not None and image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, progressive=False, optimize=False)
    flat = pixels.reshape(-1, 3)
    return Processed(
        out.getvalue(), fixes, flat.sum(0, dtype=np.float64), np.square(flat).sum(0, dtype=np.float64), len(flat)
    )


__all__ = ["BadImageError", "Processed", "process_image", "stored_size"]
