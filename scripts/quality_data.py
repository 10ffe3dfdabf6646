"""Build the labelled photo folders `simserver bench quality` was measured on (README, quality table).

    apt-get install gcompris-qt-data dataset-fashion-mnist
    .venv/bin/python scripts/quality_data.py var/quality-data

writes `var/quality-data/gcompris-photos/<category>/*.webp` (the real photos of GCompris'
categorisation and "explore world animals" activities: fishes, monuments, renewable, tools, others,
animals; 155 photos; the package's credits list them as CC0 / public domain) and
`var/quality-data/fashion-mnist-600/<class>/*.png` (60 random training images per class, seed 0;
MIT). The third set of the table is `../shared/data/images/furniture_cc0` (CC0 renders) as is.
Nothing here is committed: the folders are rebuilt from the packages.

GCompris ships its images inside Qt resource bundles (`.rcc`); :func:`read_rcc` reads that format
(a header, a tree of 22-byte entries, UTF-16 names, zlib- or uncompressed data).
"""

from __future__ import annotations

import gzip
import logging
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

RCC = Path("/usr/share/gcompris-qt/rcc")
FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
CATEGORIZATION = "gcompris/src/activities/categorization/resource/images"
ANIMALS = "gcompris/src/activities/explore_world_animals/resource/animals"


def read_rcc(path: Path) -> dict[str, bytes]:
    """Every file of a Qt resource bundle (format versions 2 and 3), by its path inside."""
    b = path.read_bytes()
    if b[:4] != b"qres":
        raise ValueError(f"{path}: not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    size = 22 if version >= 2 else 14
    out: dict[str, bytes] = {}

    def name(offset: int) -> str:
        (n,) = struct.unpack(">H", b[names + offset : names + offset + 2])
        return b[names + offset + 6 : names + offset + 6 + 2 * n].decode("utf-16-be")

    def walk(i: int, prefix: str) -> None:
        e = tree + i * size
        name_offset, flags = struct.unpack(">IH", b[e : e + 6])
        full = f"{prefix}/{name(name_offset)}" if i else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", b[e + 6 : e + 14])
            for child in range(first, first + count):
                walk(child, full)
            return
        (offset,) = struct.unpack(">I", b[e + 10 : e + 14])
        (n,) = struct.unpack(">I", b[data + offset : data + offset + 4])
        raw = b[data + offset + 4 : data + offset + 4 + n]
        if flags & 1:  # zlib, after a 4-byte uncompressed length
            raw = zlib.decompress(raw[4:])
        elif flags & 4:
            raise ValueError(f"{path}: zstd-compressed entries are not supported")
        out[full.lstrip("/")] = raw

    walk(0, "")
    return out


def gcompris(out: Path) -> int:
    files = read_rcc(RCC / "categorization.rcc") | read_rcc(RCC / "explore_world_animals.rcc")
    n = 0
    for name, data in files.items():
        for root, label in [(CATEGORIZATION, None), (ANIMALS, "animals")]:
            if not name.startswith(root + "/") or not name.endswith(".webp"):
                continue
            parts = name[len(root) + 1 :].split("/")
            category = label or parts[0]
            if category in ("alphabets", "numbers"):  # drawings, not photos
                continue
            dst = out / category / parts[-1]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            n += 1
    return n


def fashion_mnist(out: Path, per_class: int = 60, seed: int = 0) -> int:
    from PIL import Image

    images = np.frombuffer(gzip.open(FASHION / "train-images-idx3-ubyte.gz").read()[16:], np.uint8)
    labels = np.frombuffer(gzip.open(FASHION / "train-labels-idx1-ubyte.gz").read()[8:], np.uint8)
    images = images.reshape(-1, 28, 28)
    rng = np.random.default_rng(seed)
    for k, name in enumerate(FASHION_CLASSES):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in rng.choice(np.flatnonzero(labels == k), per_class, replace=False):
            Image.fromarray(images[i]).save(out / name / f"{i}.png")
    return per_class * len(FASHION_CLASSES)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "var/quality-data")
    logger.info("gcompris-photos: %d photos", gcompris(out / "gcompris-photos"))
    logger.info("fashion-mnist-600: %d images", fashion_mnist(out / "fashion-mnist-600"))


if __name__ == "__main__":
    main()
