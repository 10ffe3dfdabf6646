"""Synthetic copies of a photo, as a duplicate listing shows it: cropped (65-90%), downscaled
(35-60%), re-compressed (JPEG q15-40), colour-jittered, rotated (3-10 degrees), captioned, padded,
mirrored, or crop + colour + caption + JPEG together (:data:`TRANSFORMS`). Seeded, so a
calibration's copies come out the same each time. The positives of the duplicate calibration
(:mod:`simserver.duplicates`) and of ``simserver bench duplicates``.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

TRANSFORMS = (
    "crop",
    "downscale",
    "jpeg",
    "colour",
    "rotate",
    "text",
    "border",
    "mirror",
    "combination",
)


def _rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB") if img.mode != "RGB" else img


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    f = rng.uniform(0.65, 0.9)
    cw, ch = max(1, int(w * f)), max(1, int(h * f))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def _downscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    f = rng.uniform(0.35, 0.6)
    w, h = img.size
    return img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR)


def _jpeg(img: Image.Image, rng: np.random.Generator, quality: int | None = None) -> Image.Image:
    buf = io.BytesIO()
    _rgb(img).save(buf, "JPEG", quality=quality or int(rng.integers(15, 41)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = _rgb(img)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-12, 13))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = rng.uniform(3, 10) * rng.choice([-1, 1])
    return _rgb(img).rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(255, 255, 255))


def _text(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = _rgb(img).copy()
    w, h = img.size
    draw = ImageDraw.Draw(img)
    size = max(10, h // 9)
    try:
        from PIL import ImageFont

        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow without scalable default font
        font = None
    words = rng.choice(["SALE -30%", "NEW", "shop.example", "BEST PRICE", "(c) seller"])
    y = int(rng.uniform(0.05, 0.8) * h)
    draw.text((int(0.05 * w), y), str(words), fill=(255, 0, 0), font=font)
    draw.text((int(0.3 * w), int(0.9 * h) - size), "www.example.com", fill=(255, 255, 255), font=font)
    return img


def _border(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    pad = max(2, int(max(w, h) * rng.uniform(0.05, 0.15)))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return ImageOps.expand(_rgb(img), border=pad, fill=colour)


def _mirror(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(_rgb(img))


def _combination(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return _jpeg(_text(_colour(_crop(img, rng), rng), rng), rng)


_APPLY: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "crop": _crop,
    "downscale": _downscale,
    "jpeg": _jpeg,
    "colour": _colour,
    "rotate": _rotate,
    "text": _text,
    "border": _border,
    "mirror": _mirror,
    "combination": _combination,
}


def synthetic_copy(img: Image.Image, transform: str, rng: np.random.Generator) -> Image.Image:
    """``img`` edited the way a re-listing edits a product photo (one of :data:`TRANSFORMS`)."""
    return _rgb(_APPLY[transform](_rgb(img), rng))


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
