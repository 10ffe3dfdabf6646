"""Decode untrusted image bytes into the encoder's input: RGB uint8, square, fixed size.

All the mode handling lives here so every entry point (search, similarity, training, CLI) sees
the same pixels: EXIF orientation applied, transparency composited on white (product shots are
usually on white, and black would make every transparent PNG look alike), palette/CMYK/16-bit
converted, then padded to a square on white and resized, so the whole product stays in frame.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from simserver.errors import BadImage, TooLarge

logger = logging.getLogger(__name__)

# PIL's own bomb check is a global warning; we check per domain limit instead, before decoding.
Image.MAX_IMAGE_PIXELS = None
WHITE = (255, 255, 255)


def open_image(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode ``data`` fully, or raise :class:`BadImage` / :class:`TooLarge` naming the problem."""
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(f"{name}: not an image (unrecognised format)") from None
    except Exception as exc:  # PIL raises many types on hostile headers
        raise BadImage(f"{name}: cannot read image header ({exc})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise TooLarge(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise BadImage(f"{name}: image has no pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img) or img
    except Exception as exc:
        raise BadImage(f"{name}: corrupt or truncated image ({exc})") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, compositing transparency on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        # 16-bit files use the whole range; int/float modes may not, so scale by the actual maximum.
        scale = 65535.0 if mode.startswith("I;16") or hi > 255 else 255.0
        scale = max(scale, hi) if mode in ("I", "F") and hi > 255 else scale
        arr8 = np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK, YCbCr, LAB, HSV, 1: PIL's own conversion (it already un-inverts Adobe CMYK JPEGs).
    return img.convert("RGB")


def square(img: Image.Image, size: int) -> Image.Image:
    """Fit inside ``size`` x ``size`` and pad on white (keeps the whole object in frame).

    Shrinking comes first: padding a 40000x1000 image to a square first would allocate 4.8 GB.
    """
    w, h = img.size
    scale = size / max(w, h)
    fitted = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = img.resize(fitted, Image.Resampling.BILINEAR, reducing_gap=3.0)
    if fitted == (size, size):
        return img
    canvas = Image.new("RGB", (size, size), WHITE)
    canvas.paste(img, ((size - fitted[0]) // 2, (size - fitted[1]) // 2))
    return canvas


def prepare(data: bytes, size: int, max_pixels: int, name: str = "image") -> np.ndarray:
    """Bytes -> ``uint8 [size, size, 3]`` ready for :meth:`Encoder.encode`."""
    img = open_image(data, max_pixels, name)
    try:
        rgb = to_rgb(img)
        return np.asarray(square(rgb, size), dtype=np.uint8)
    except Exception as exc:
        raise BadImage(f"{name}: cannot convert image ({exc})") from None
