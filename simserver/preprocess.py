"""Decode untrusted image bytes into the encoder's input: RGB uint8, square, fixed size.

All the mode handling lives here so every entry point (search, similarity, training, CLI) sees
the same pixels: EXIF orientation applied, transparency composited on white (product shots are
usually on white, and black would make every transparent PNG look alike), palette/CMYK/16-bit
converted, then padded to a square on white and resized, so the whole product stays in frame.

Memory is bounded before and during decoding, because a 77 KB PNG can hold 40 million 16-bit
pixels: the decoded size (width x height x bytes per pixel) is checked against a limit from the
header alone, a large JPEG is decoded at a reduced scale (its DCT allows 1/2, 1/4, 1/8), and a
large image of any other format is converted and shrunk strip by strip, so no full-size RGB,
float or composited copy of it ever exists (measured: a 6300x6300 16-bit PNG cost 987 MB, now
within the decoded size plus a few MB).
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
# 40 million pixels at PIL's 4 bytes per pixel (RGB is stored padded to 4).
DEFAULT_MAX_DECODED_BYTES = 160 * 2**20
# Above this decoded size an image takes the strip-by-strip path; below it, the direct one (both
# give the same pixels within rounding; the direct path keeps earlier versions' vectors exact).
LEAN_ABOVE_BYTES = 48 * 2**20
STRIP_BYTES = 4 * 2**20  # one strip of the lean path, whatever the image's width
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """What PIL holds for a decoded image: 1 byte per pixel for 1/L/P, 2 for 16-bit, else 4."""
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode in _SIXTEEN_BIT else 4
    return width * height * per_pixel


def open_image(
    data: bytes,
    max_pixels: int,
    name: str = "image",
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    target: int | None = None,
) -> Image.Image:
    """Decode ``data``, or raise :class:`BadImage` / :class:`TooLarge` naming the problem.

    With ``target`` (the side the image will be shrunk to), a JPEG too large for the direct path is
    decoded at the smallest DCT scale that keeps at least twice that side."""
    img = _header(data, max_pixels, name, max_decoded_bytes)
    if target is not None and _is_lean(img) and img.format == "JPEG":
        w, h = img.size
        scale = 2 * target / max(w, h)
        img.draft(img.mode, (max(1, int(w * scale)), max(1, int(h * scale))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as exc:
        raise BadImage(f"{name}: corrupt or truncated image ({exc})") from None
    return img


def _header(data: bytes, max_pixels: int, name: str, max_decoded_bytes: int) -> Image.Image:
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
    size = decoded_bytes(img.mode, width, height)
    if size > max_decoded_bytes:
        raise TooLarge(
            f"{name}: {width}x{height} {img.mode} decodes to {size} bytes; the limit is {max_decoded_bytes}"
        )
    return img


def image_pixel_count(data: bytes) -> int:
    """width x height from the header alone (0 if it is not an image)."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception:
        return 0
    return width * height


def _is_lean(img: Image.Image) -> bool:
    return decoded_bytes(img.mode, *img.size) > LEAN_ABOVE_BYTES


def _gray_scale(img: Image.Image) -> float:
    """The value of a 16-bit, 32-bit integer or float gray image that maps to 255."""
    extrema = img.getextrema()  # one band here: (min, max)
    hi = float(extrema[1] or 0.0) if not isinstance(extrema[1], tuple) else float(max(extrema[1]))
    # 16-bit files use the whole range; int/float modes may not, so scale by the actual maximum.
    scale = 65535.0 if img.mode.startswith("I;16") or hi > 255 else 255.0
    return max(scale, hi) if img.mode in ("I", "F") and hi > 255 else scale


def _gray8(img: Image.Image, scale: float) -> Image.Image:
    """16-bit, 32-bit integer or float gray -> 8-bit ``L``, converted strip by strip (a float64
    copy of a 40-megapixel image is 320 MB)."""
    width, height = img.size
    out = np.empty((height, width), np.uint8)
    rows = max(1, STRIP_BYTES // (8 * width))
    for top in range(0, height, rows):
        strip = np.asarray(img.crop((0, top, width, min(height, top + rows))), dtype=np.float64)
        out[top : top + strip.shape[0]] = np.clip(strip / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def to_rgb(img: Image.Image, scale: float | None = None) -> Image.Image:
    """Any PIL mode -> RGB, compositing transparency on white. ``scale``: for 16-bit, integer and
    float gray, the value that maps to 255 (default: from the image itself)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return _gray8(img, _gray_scale(img) if scale is None else scale).convert("RGB")
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


def _lean_rgb(img: Image.Image, size: int) -> Image.Image:
    """A large image -> RGB at most ~3x ``size`` per side, converted and box-reduced one strip at a
    time: memory is the decoded image plus one strip, whatever the mode (strip heights are
    multiples of the reduction factor, so the strips' reductions tile exactly)."""
    width, height = img.size
    factor = max(1, int(max(width, height) / size / 3))
    # One scale for the whole image: each strip's own maximum would band its brightness.
    scale = _gray_scale(img) if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F") else None
    rows = max(factor, (STRIP_BYTES // (4 * width)) // factor * factor)
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)), WHITE)
    for top in range(0, height, rows):
        strip = to_rgb(img.crop((0, top, width, min(height, top + rows))), scale)
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    return out


def prepare(
    data: bytes,
    size: int,
    max_pixels: int,
    name: str = "image",
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> np.ndarray:
    """Bytes -> ``uint8 [size, size, 3]`` ready for :meth:`Encoder.encode`."""
    img = open_image(data, max_pixels, name, max_decoded_bytes, target=size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if _is_lean(img):
                rgb = _lean_rgb(img, size)
                # After shrinking: a transposed copy of the full image would double its memory.
                rgb = _oriented(rgb, img)
            else:
                rgb = to_rgb(ImageOps.exif_transpose(img) or img)
        return np.asarray(square(rgb, size), dtype=np.uint8)
    except (TooLarge, BadImage):
        raise
    except Exception as exc:
        raise BadImage(f"{name}: cannot convert image ({exc})") from None


def _oriented(small: Image.Image, original: Image.Image) -> Image.Image:
    """``small`` turned as the EXIF orientation of ``original`` says."""
    orientation = original.getexif().get(0x0112, 1)
    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return small.transpose(method) if method is not None else small
