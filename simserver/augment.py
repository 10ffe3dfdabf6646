"""Augmented views of training images for small sets: flip, crop and colour jitter.

Deterministic: a view depends only on the image's content hash, the view number and the seed, so
retraining on the same data gives the same views (and the feature cache can keep them).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageEnhance


def view_seed(content_hash: str, view: int, seed: int) -> int:
    digest = hashlib.sha256(f"{content_hash}:{view}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``uint8 [S, S, 3]`` -> an augmented ``uint8 [S, S, 3]``."""
    size = pixels.shape[0]
    img = Image.fromarray(pixels)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Random resized crop: 60-100% of the area, aspect 3:4 to 4:3.
    area = rng.uniform(0.6, 1.0) * size * size
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    w = int(round(min(size, np.sqrt(area * aspect))))
    h = int(round(min(size, np.sqrt(area / aspect))))
    left = int(rng.integers(0, size - w + 1))
    top = int(rng.integers(0, size - h + 1))
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(0.8, 1.2)))
    return np.asarray(img, dtype=np.uint8)


def view(pixels: np.ndarray, content_hash: str, index: int, seed: int) -> np.ndarray:
    """Augmented view number ``index`` of an image."""
    return augment(pixels, np.random.default_rng(view_seed(content_hash, index, seed)))
