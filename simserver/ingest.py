"""Training-set ingestion from a zip (HTTP uploads) or a folder (CLI): ``<category>/<image>``.

Hostile archives are refused as a whole (not a zip, absolute or ``..`` paths, links, too many
entries, too many uncompressed bytes, decompression-bomb images); a merely broken image inside an
otherwise good archive is skipped and reported, so one bad file does not cost the whole upload.
"""

from __future__ import annotations

import csv
import io
import logging
import lzma
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np
from PIL import Image

from simserver.domain_config import Limits
from simserver.errors import BadArchive, BadImage, TooLarge
from simserver.preprocess import DEFAULT_MAX_DECODED_BYTES, image_pixel_count, prepare
from simserver.schemas import Skipped

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.csv"
R = TypeVar("R")
_IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
_MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


@dataclass
class Sample:
    name: str  # "<category>/<file>" as in the archive
    label: str
    data: bytes
    media_type: str
    metadata: dict[str, str] = field(default_factory=dict)
    image_size: int = 224
    max_pixels: int = 40_000_000
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    id: str = ""  # stable item id: metadata.csv's "id" column, else the archive path (name)
    # Where the image already is in the store (a distributed build's actors put it there; then
    # ``data`` may be empty); "": publishing stores ``data``.
    image_key: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = self.name

    @property
    def pixels(self) -> np.ndarray:
        """uint8 [S, S, 3], decoded on demand: holding 150 KB of pixels per image for a whole
        training set would cost 1.5 GB per 10,000 images; decoding twice costs a few ms each."""
        return prepare(self.data, self.image_size, self.max_pixels, self.name, self.max_decoded_bytes)


def _sample(
    name: str,
    label: str,
    data: bytes,
    limits: Limits,
    image_size: int,
    metadata: dict[str, str] | None = None,
    item_id: str = "",
) -> Sample:
    return Sample(
        name,
        label,
        data,
        _media_type(data),
        dict(metadata or {}),
        image_size,
        limits.max_image_pixels,
        limits.max_decoded_bytes,
        item_id,
    )


class PixelBudget:
    """What one multi-image request may decode in all (a site's images), charged from each image's
    header before it is decoded: decoding is what such a request costs (measured: 8 zero-filled
    40-megapixel PNGs in a 3.6 KB zip kept a request busy 19 s)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.spent = limit, 0

    def charge(self, name: str, data: bytes) -> None:
        self.spent += image_pixel_count(data)
        if self.spent > self.limit:
            raise TooLarge(
                f"{name}: the request's images hold more than {self.limit} pixels in all "
                "(the limit per request); send fewer or smaller images"
            )


@dataclass
class Dataset:
    samples: list[Sample]
    skipped: list[Skipped]

    def labels(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.samples:
            counts[s.label] = counts.get(s.label, 0) + 1
        return dict(sorted(counts.items()))


def _media_type(data: bytes) -> str:
    try:
        fmt = Image.open(io.BytesIO(data)).format or ""
    except Exception:
        fmt = ""
    return _MEDIA_TYPES.get(fmt, "application/octet-stream")


def _safe_parts(name: str) -> tuple[str, ...]:
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BadArchive(f"archive entry {name!r} has an absolute or Windows path; refusing the archive")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise BadArchive(f"archive entry {name!r} climbs out of the archive ('..'); refusing the archive")
    return tuple(p for p in parts if p not in ("", "."))


def _strip_wrapper(paths: list[tuple[str, ...]]) -> int:
    """How many leading folders all entries share (zipping a folder adds one), keeping the category."""
    depth = 0
    while True:
        firsts = {p[depth] for p in paths if len(p) > depth + 2}
        if len(firsts) != 1 or any(len(p) <= depth + 2 for p in paths):
            return depth
        depth += 1


MAX_ID_CHARS = 512


def check_item_id(item_id: str, where: str = "id") -> str:
    """A stable item id as given (``metadata.csv``'s ``id`` column, an ``ids`` form field):
    1..512 characters, no control characters, not only spaces."""
    if not item_id.strip():
        raise BadArchive(f"{where}: an item id must not be empty")
    if len(item_id) > MAX_ID_CHARS:
        raise BadArchive(f"{where}: item id of {len(item_id)} characters; at most {MAX_ID_CHARS}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in item_id):
        raise BadArchive(f"{where}: item id {item_id!r} holds control characters")
    return item_id


def check_unique_ids(samples: list[Sample]) -> None:
    seen: dict[str, str] = {}
    for s in samples:
        if s.id in seen:
            raise BadArchive(
                f"item id {s.id!r} is given twice ({seen[s.id]} and {s.name}); ids must be unique"
            )
        seen[s.id] = s.name


def _parse_metadata(data: bytes) -> dict[str, dict[str, str]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadArchive(f"{METADATA_FILE}: not UTF-8 text ({exc})") from None
    # strict: broken quoting is an error, not silently merged cells.
    reader = csv.DictReader(io.StringIO(text), strict=True)
    try:
        columns = reader.fieldnames or []
        rows = list(reader)
    except csv.Error as exc:
        raise BadArchive(f"{METADATA_FILE}: malformed CSV at line {reader.line_num}: {exc}") from None
    if "filename" not in columns:
        raise BadArchive(f"{METADATA_FILE}: needs a 'filename' column (found {columns})")
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        fname = (row.pop("filename") or "").strip().lstrip("./")
        if fname:
            out[fname] = {k: (v or "") for k, v in row.items() if k}
    return out


def _checked_image(
    name: str,
    read: Callable[[], bytes],
    limits: Limits,
    image_size: int,
    skipped: list[Skipped],
    progress: Callable[[int], None] | None,
) -> bytes | None:
    """The entry's bytes if they decode as an image (pixels are decoded again when encoded); a
    broken image is skipped and listed, an oversized one refuses the whole archive."""
    data = read()
    try:
        prepare(data, image_size, limits.max_image_pixels, name, limits.max_decoded_bytes)
    except TooLarge as exc:
        raise TooLarge(f"refusing the archive: {exc.message}") from None
    except BadImage as exc:
        skipped.append(Skipped(name=name, reason=exc.message.removeprefix(f"{name}: ")))
        return None
    finally:
        if progress:
            progress(1)
    return data


def layout(
    listed: list[tuple[tuple[str, ...], R]],
) -> tuple[R | None, list[tuple[tuple[str, ...], R]], list[Skipped]]:
    """``<category>/<image>`` entries (path parts, reader), the wrapper folder a zipped folder adds
    stripped: the ``metadata.csv`` entry's reader (None if absent), the images (relative parts,
    reader) and the entries outside any category folder, skipped. The local and the distributed
    builds (:mod:`simserver.distributed`) read a set through this one rule."""
    depth = _strip_wrapper([p for p, _ in listed if p[-1] != METADATA_FILE])
    metadata: R | None = None
    images: list[tuple[tuple[str, ...], R]] = []
    skipped: list[Skipped] = []
    for parts, read in listed:
        rel = parts[depth:] if len(parts) > depth else parts
        if rel and rel[-1] == METADATA_FILE and len(rel) == 1:
            metadata = read
        elif len(rel) < 2:
            skipped.append(Skipped(name="/".join(parts), reason="not inside a category folder"))
        else:
            images.append((rel, read))
    return metadata, images, skipped


def metadata_finder(
    metadata: dict[str, dict[str, str]], images: list[tuple[str, ...]]
) -> Callable[[tuple[str, ...]], tuple[dict[str, str], str]]:
    """``find(rel)`` -> (metadata, item id) of one image: its ``metadata.csv`` row by path, else by
    file name when that name is unique in the set; the ``id`` column is the item id ("" if none)."""
    by_basename: dict[str, int] = {}
    for rel in images:
        by_basename[rel[-1]] = by_basename.get(rel[-1], 0) + 1

    def find(rel: tuple[str, ...]) -> tuple[dict[str, str], str]:
        name = "/".join(rel)
        meta = metadata.get(name)
        if meta is None and by_basename.get(rel[-1]) == 1:
            meta = metadata.get(rel[-1])
        meta = dict(meta or {})
        item_id = meta.pop("id", "") or ""
        if item_id:
            check_item_id(item_id, f"{METADATA_FILE}: {name}")
        return meta, item_id

    return find


def _build(
    entries: Iterable[tuple[tuple[str, ...], Callable[[], bytes]]],
    limits: Limits,
    image_size: int,
    progress: Callable[[int], None] | None = None,
    labelled: bool = True,
    budget: PixelBudget | None = None,
) -> Dataset:
    listed = list(entries)
    if not labelled:  # a bag of images (one supplier site): any layout, no categories
        return _build_unlabelled(listed, limits, image_size, progress, budget)
    metadata_reader, images, skipped = layout(listed)
    metadata = _parse_metadata(metadata_reader()) if metadata_reader else {}
    samples: list[Sample] = []
    find = metadata_finder(metadata, [rel for rel, _ in images])
    for rel, read in images:
        name = "/".join(rel)
        data = _checked_image(name, read, limits, image_size, skipped, progress)
        if data is None:
            continue
        meta, item_id = find(rel)
        samples.append(_sample(name, rel[0], data, limits, image_size, meta, item_id))
    if not samples:
        raise BadArchive(
            f"no usable image: expected <category>/<image> entries; {len(skipped)} skipped"
            + (f" (first: {skipped[0].name}: {skipped[0].reason})" if skipped else "")
        )
    check_unique_ids(samples)
    return Dataset(samples, skipped)


def _build_unlabelled(
    listed: list[tuple[tuple[str, ...], Callable[[], bytes]]],
    limits: Limits,
    image_size: int,
    progress: Callable[[int], None] | None,
    budget: PixelBudget | None,
) -> Dataset:
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    read_all = [("/".join(parts), read()) for parts, read in listed]
    if budget is not None:  # every header first: an over-budget site is refused before any decoding
        for name, data in read_all:
            budget.charge(name, data)
    for name, raw in read_all:
        if _checked_image(name, partial(_given, raw), limits, image_size, skipped, progress) is not None:
            samples.append(_sample(name, "", raw, limits, image_size))
    if not samples:
        raise BadArchive(
            f"no usable image in the archive; {len(skipped)} skipped"
            + (f" (first: {skipped[0].name}: {skipped[0].reason})" if skipped else "")
        )
    return Dataset(samples, skipped)


def _visible(parts: tuple[str, ...]) -> bool:
    return (
        bool(parts)
        and parts[0] != "__MACOSX"
        and not any(p.startswith(".") for p in parts)
        and parts[-1] not in _IGNORED_NAMES
    )


def read_zip(
    data: bytes,
    limits: Limits,
    image_size: int = 224,
    progress: Callable[[int], None] | None = None,
    labelled: bool = True,
    budget: PixelBudget | None = None,
) -> Dataset:
    """``labelled``: ``<category>/<image>`` entries (training); else any layout (a site's images).
    ``budget``: the pixels the whole request may decode."""
    if not data:
        raise BadArchive("archive is empty")
    if len(data) > limits.max_upload_bytes:
        raise TooLarge(f"archive is {len(data)} bytes; the limit is {limits.max_upload_bytes}")
    declared = _declared_entries(data)
    if declared is not None and declared > 2 * limits.max_entries:
        # Refuse before zipfile parses millions of directory entries (folders included).
        raise TooLarge(f"archive declares {declared} entries; the limit is {limits.max_entries} files")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise BadArchive(f"archive is not a valid zip file ({exc})") from None
    files = [i for i in infos if not i.is_dir()]
    if len(files) > limits.max_entries or len(infos) > 2 * limits.max_entries:
        raise TooLarge(f"archive has {len(files)} files; the limit is {limits.max_entries}")
    total = sum(i.file_size for i in files)
    if total > limits.max_uncompressed_bytes:
        raise TooLarge(f"archive expands to {total} bytes; the limit is {limits.max_uncompressed_bytes}")
    # From the headers, before inflating anything: a 1 MB entry of zeros may claim 1 GB (and the
    # reader never reads more than an entry claims, so the claim is what it costs).
    if oversized := next((i for i in files if i.file_size > limits.max_entry_bytes), None):
        raise TooLarge(
            f"archive entry {oversized.filename!r} expands to {oversized.file_size} bytes; "
            f"the limit is {limits.max_entry_bytes} per entry"
        )
    entries = []
    for info in infos:
        parts = _safe_parts(info.filename)
        if info.is_dir():
            continue
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise BadArchive(f"archive entry {info.filename!r} is a symbolic link; refusing the archive")
        if info.flag_bits & 0x1:
            raise BadArchive(f"archive entry {info.filename!r} is encrypted")
        if _visible(parts):
            entries.append((parts, _reader(zf, info)))
    return _build(entries, limits, image_size, progress, labelled, budget)


def read_site(
    archive: bytes | None, files: list[tuple[str, bytes]], limits: Limits, image_size: int = 224
) -> Dataset:
    """One supplier site's images, from a zip (any layout) and/or uploaded files (name, bytes).
    Broken images are skipped and listed; a site with no usable image is refused."""
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    budget = PixelBudget(limits.max_request_pixels)
    for name, data in files:
        budget.charge(name, data)
    if archive is not None:
        try:
            site = read_zip(archive, limits, image_size, labelled=False, budget=budget)
            samples.extend(site.samples)
            skipped.extend(site.skipped)
        except BadArchive as exc:
            if "no usable image" not in exc.message or not files:
                raise
            skipped.append(Skipped(name="archive", reason=exc.message))
    if len(samples) + len(skipped) + len(files) > limits.max_entries:
        raise TooLarge(
            f"{len(samples) + len(skipped) + len(files)} images in all; the limit is {limits.max_entries}"
        )
    for name, data in files:
        if _checked_image(name, partial(_given, data), limits, image_size, skipped, None) is not None:
            samples.append(_sample(name, "", data, limits, image_size))
    if not samples:
        raise BadArchive(
            "no usable image in the site's upload"
            + (f" ({len(skipped)} skipped; first: {skipped[0].name}: {skipped[0].reason})" if skipped else "")
        )
    return Dataset(samples, skipped)


LABEL_CHARS = 256


def read_items(
    archive: bytes | None,
    files: list[tuple[str, bytes]],
    label: str | None,
    ids: list[str] | None,
    limits: Limits,
    image_size: int = 224,
) -> Dataset:
    """An upload of catalog items: a zip in the training layout (``<label>/<image>``, optional
    ``metadata.csv`` with an optional ``id`` column) and/or files (name, bytes) that all take
    ``label``, with optional ``ids`` (one per file; default ``<label>/<file name>``)."""
    if archive is None and not files:
        raise BadArchive("send items as a zip in 'archive' and/or as files in 'images' (with a 'label')")
    if files and not (label or "").strip():
        raise BadArchive("label: files in 'images' need a 'label' (the category they all belong to)")
    if label is not None and (len(label) > LABEL_CHARS or "/" in label or any(ord(c) < 32 for c in label)):
        raise BadArchive(
            f"label: {label!r} is not a valid label (no '/', control characters; <= {LABEL_CHARS})"
        )
    if ids and len(ids) != len(files):
        raise BadArchive(
            f"ids: {len(ids)} ids for {len(files)} files in 'images'; send one id per file, or none"
        )
    budget = PixelBudget(limits.max_request_pixels)
    for name, data in files:  # every file's header before any is decoded
        budget.charge(name, data)
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    if archive is not None:
        got = read_zip(archive, limits, image_size)
        samples += got.samples
        skipped += got.skipped
    if len(samples) + len(skipped) + len(files) > limits.max_entries:
        total = len(samples) + len(skipped) + len(files)
        raise TooLarge(f"{total} items in one upload; the limit is {limits.max_entries}")
    for i, (name, data) in enumerate(files):
        base = PurePosixPath(name.replace("\\", "/")).name or f"image-{i}"
        item_id = check_item_id(ids[i], f"ids[{i}]") if ids else f"{label}/{base}"
        if _checked_image(base, partial(_given, data), limits, image_size, skipped, None) is not None:
            samples.append(_sample(f"{label}/{base}", str(label), data, limits, image_size, None, item_id))
    if not samples:
        raise BadArchive(
            "no usable image in the upload"
            + (f" ({len(skipped)} skipped; first: {skipped[0].name}: {skipped[0].reason})" if skipped else "")
        )
    check_unique_ids(samples)
    return Dataset(samples, skipped)


def _given(data: bytes) -> bytes:
    """An uploaded file's reader (:func:`_checked_image` takes a reader, as for archive entries)."""
    return data


def _declared_entries(data: bytes) -> int | None:
    """Total entries from the end-of-central-directory record (None if not found or zip64)."""
    pos = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if pos < 0 or pos + 22 > len(data):
        return None
    total = int.from_bytes(data[pos + 10 : pos + 12], "little")
    return None if total == 0xFFFF else total


def _reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        # Never trust the header's size: read at most one byte more than it claims.
        try:
            with zf.open(info) as f:
                data = f.read(info.file_size + 1)
        except (
            zipfile.BadZipFile,
            OSError,
            EOFError,
            NotImplementedError,
            RuntimeError,
            ValueError,
            zlib.error,
            lzma.LZMAError,
        ) as exc:
            raise BadArchive(f"archive entry {info.filename!r} cannot be read ({exc})") from None
        if len(data) > info.file_size:
            raise BadArchive(f"archive entry {info.filename!r} is larger than its header says")
        return data

    return read


def read_folder(
    root: str | Path, limits: Limits, image_size: int = 224, progress: Callable[[int], None] | None = None
) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise BadArchive(f"{root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    entries = [
        (parts, (lambda p=p: p.read_bytes())) for p in paths if _visible(parts := p.relative_to(root).parts)
    ]
    if len(entries) > limits.max_entries:
        raise TooLarge(f"folder has {len(entries)} files; the limit is {limits.max_entries}")
    return _build(entries, limits, image_size, progress)


def count_entries(source: str | Path) -> int:
    """For progress bars: number of files a folder or zip holds."""
    p = Path(source)
    if p.is_dir():
        return sum(1 for q in p.rglob("*") if q.is_file())
    with zipfile.ZipFile(p) as zf:
        return sum(1 for i in zf.infolist() if not i.is_dir())


def iter_chunks(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
