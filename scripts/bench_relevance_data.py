"""Real-photo sets for `simserver bench relevance --data DIR`, built from two Debian packages.

    apt-get install gcompris-qt-data dataset-fashion-mnist
    .venv/bin/python scripts/bench_relevance_data.py var/bench-data

writes one ``<set>/<category>/<image>`` folder per set (none is committed: they are rebuilt from the
packages). The photos come from GCompris' categorization activity (CC0 / public domain per its
credits, the same source as /work/shared's photos_gcompris), the "clipart" class from its word-sample
drawings (what a supplier site shows besides products: logos, drawings), and Fashion-MNIST (MIT,
Zalando Research) product photos. GCompris ships its images inside Qt resource files (``.rcc``),
read here with a small parser of that format.

| set | target (photos) | other categories |
|---|---|---|
| gcompris-fishes | fishes (28) | monuments, renewable, tools, others, clipart |
| gcompris-windmills | windmill (16) | solar, dam, monuments, tools, others, clipart |
| fashion-mnist-sandals | Sandal (40) | the 9 other Fashion-MNIST classes, 40 each |
| gcompris-hammers | hammer (9) | measuringTape, pliers, scissors, screwdriver, other tools, others, clipart |
"""

from __future__ import annotations

import gzip
import re
import shutil
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

RCC = Path("/usr/share/gcompris-qt/rcc")
MNIST = Path("/usr/share/datasets/fashion-mnist")
CATEGORIZATION = "gcompris/src/activities/categorization/resource/images"
WORDS = "gcompris/src/activities/lang/resource/words_sample"
FASHION = [
    "T-shirt",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle-boot",
]
PER_FASHION_CLASS = 40


def rcc_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every file in a Qt resource file (format versions 1-3, zlib or stored)."""
    b = path.read_bytes()
    if b[:4] != b"qres":
        raise ValueError(f"{path}: not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node = 22 if version >= 2 else 14

    def name(offset: int) -> str:
        n = struct.unpack(">H", b[names + offset : names + offset + 2])[0]
        return b[names + offset + 6 : names + offset + 6 + 2 * n].decode("utf-16-be")

    def walk(i: int, prefix: str) -> Iterator[tuple[str, bytes]]:
        p = tree + i * node
        name_offset, flags = struct.unpack(">IH", b[p : p + 6])
        here = f"{prefix}/{name(name_offset)}" if i else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", b[p + 6 : p + 14])
            for child in range(first, first + count):
                yield from walk(child, here)
            return
        offset = data + struct.unpack(">I", b[p + 10 : p + 14])[0]
        size = struct.unpack(">I", b[offset : offset + 4])[0]
        raw = b[offset + 4 : offset + 4 + size]
        yield here.lstrip("/"), zlib.decompress(raw[4:]) if flags & 1 else raw

    yield from walk(0, "")


def gcompris() -> dict[str, dict[str, bytes]]:
    """{folder: {file name: bytes}} of the categorization photos and the word-sample drawings."""
    out: dict[str, dict[str, bytes]] = {}
    for path, raw in rcc_files(RCC / "categorization.rcc"):
        if path.startswith(CATEGORIZATION) and path.endswith(".webp"):
            folder, name = path[len(CATEGORIZATION) + 1 :].split("/")
            out.setdefault(folder, {})[name] = raw
    for path, raw in rcc_files(RCC / "lang.rcc"):
        if path.startswith(WORDS) and path.endswith(".webp"):
            out.setdefault("clipart", {})[path.rsplit("/", 1)[1]] = raw
    return out


def item(name: str) -> str:
    """'hammer3.webp' -> 'hammer'."""
    return re.sub(r"\d*\.webp$", "", name)


def write(root: Path, label: str, files: dict[str, bytes]) -> None:
    (root / label).mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (root / label / name).write_bytes(raw)


def fashion_mnist(root: Path) -> None:
    with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    for c, label in enumerate(FASHION):
        (root / label).mkdir(parents=True, exist_ok=True)
        for j in np.flatnonzero(y == c)[:PER_FASHION_CLASS]:
            Image.fromarray(255 - x[j]).save(root / label / f"{j}.png")  # dark product on white


def main(out: Path) -> None:
    g = gcompris()
    photos = ("monuments", "renewable", "tools", "others")
    sets = {
        "gcompris-fishes": {k: g[k] for k in ("fishes", *photos, "clipart")},
        "gcompris-windmills": {
            "windmill": {n: v for n, v in g["renewable"].items() if item(n) == "windmill"},
            "solar": {n: v for n, v in g["renewable"].items() if item(n) == "solar"},
            "dam": {n: v for n, v in g["renewable"].items() if item(n) == "dam"},
            **{k: g[k] for k in ("monuments", "tools", "others", "clipart")},
        },
    }
    tools: dict[str, dict[str, bytes]] = {}
    for n, v in g["tools"].items():
        kind = item(n)
        kind = {"plier": "pliers", "screwDriver": "screwdriver"}.get(kind, kind)
        if kind not in ("hammer", "measuringTape", "pliers", "scissors", "screwdriver"):
            kind = "other-tools"
        tools.setdefault(kind, {})[n] = v
    sets["gcompris-hammers"] = {**tools, "others": g["others"], "clipart": g["clipart"]}
    for name, categories in sets.items():
        shutil.rmtree(out / name, ignore_errors=True)
        for label, files in categories.items():
            write(out / name, label, files)
    shutil.rmtree(out / "fashion-mnist-sandals", ignore_errors=True)
    fashion_mnist(out / "fashion-mnist-sandals")
    for d in sorted(out.iterdir()):
        counts = {c.name: len(list(c.iterdir())) for c in sorted(d.iterdir())}
        sys.stdout.write(f"{d.name}: {counts}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "var/bench-data"))
