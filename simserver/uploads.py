"""Uploaded files as the gateway receives them from BentoML: size-checked bytes, client names,
decoded pixels."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import anyio
import numpy as np

from simserver.domain_config import Limits
from simserver.encoder import IMAGE_SIZE
from simserver.errors import TooLarge
from simserver.preprocess import prepare
from simserver.settings import get_settings

_limiter: tuple[asyncio.AbstractEventLoop, anyio.CapacityLimiter] | None = None


def _decode_limiter() -> anyio.CapacityLimiter:
    """Uploaded images decoded at once in this process (``MAX_CONCURRENT_DECODES``): one decode of
    the largest allowed image holds ~200 MB, so 16 concurrent ones must not all run together. One
    limiter per event loop (a limiter belongs to the loop it was made in)."""
    global _limiter
    loop = asyncio.get_running_loop()
    if _limiter is None or _limiter[0] is not loop:
        _limiter = (loop, anyio.CapacityLimiter(get_settings().max_concurrent_decodes))
    return _limiter[1]


def upload_name(path: Path) -> str:
    """The client's file name: BentoML saves uploads as NamedTemporaryFile(suffix=<name>), i.e.
    'tmp' + 8 random characters + the name."""
    return re.sub(r"^tmp[a-z0-9_]{8}", "", path.name) or path.name


def read_upload(path: Path, limits: Limits, field: str) -> bytes:
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise TooLarge(f"{field}: {size} bytes exceeds the limit of {limits.max_upload_bytes}")
    return path.read_bytes()


async def read_upload_async(path: Path, limits: Limits, field: str) -> bytes:
    return await anyio.to_thread.run_sync(read_upload, path, limits, field)


def _pixels(path: Path, limits: Limits, field: str) -> np.ndarray:
    data = read_upload(path, limits, field)
    return prepare(data, IMAGE_SIZE, limits.max_image_pixels, field, limits.max_decoded_bytes)


async def image_pixels(path: Path, limits: Limits, field: str) -> np.ndarray:
    """``uint8 [S, S, 3]`` of an uploaded image; refuses non-images and oversized ones (4xx).
    Read and decoded in one worker-thread hop: this is on every search's path."""
    return await anyio.to_thread.run_sync(_pixels, path, limits, field, limiter=_decode_limiter())


def _decode_samples() -> np.ndarray:
    import io

    from PIL import Image

    out = None
    for fmt in ("PNG", "JPEG"):  # PIL imports a format's plugin on its first image
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 64, 32)).save(buf, format=fmt)
        out = prepare(buf.getvalue(), IMAGE_SIZE, 64, "warm-up", 10**6)
    assert out is not None
    return out


async def warm_up_decoding() -> np.ndarray:
    """Decode two tiny images the way an upload is (worker thread, limiter): the first search
    after start-up then pays for no thread start or plugin import. Returns pixels to search with."""
    return await anyio.to_thread.run_sync(_decode_samples, limiter=_decode_limiter())
