"""Helpers shared by the unit tests: image/zip builders and a numpy stand-in for the encoder.

Nothing here imports TensorFlow: the unit suite must stay fast.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo"
TEST_DATA = ROOT / "tests" / "data"

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def solid(color, size: tuple[int, int] = (32, 32), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, size, color), fmt)


def make_zip(entries, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """``entries``: mapping or pairs of (name or ZipInfo, bytes)."""
    items = entries.items() if isinstance(entries, dict) else entries
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in items:
            zf.writestr(name, data)
    return buf.getvalue()


_PROJECTION = np.random.default_rng(1234).standard_normal((3 + 4 * 4 * 3, 32)).astype(np.float32)


def fake_encode(pixels: np.ndarray) -> np.ndarray:
    """Deterministic stand-in for the encoder: mean colour and a 4x4 colour layout, projected to 32-d."""
    x = np.asarray(pixels, dtype=np.float32) / 255.0
    n, h, w, _ = x.shape
    grid = x.reshape(n, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4)).reshape(n, -1)
    feats = np.concatenate([x.mean(axis=(1, 2)), grid], axis=1)
    return feats @ _PROJECTION


@pytest.fixture
def store(tmp_path):
    from simserver.store import LocalStore

    return LocalStore(tmp_path / "store")


@pytest.fixture
def repo(store):
    from simserver.repository import Repository

    return Repository(store)
