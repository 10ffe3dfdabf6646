"""simserver.ingest: training sets from zips and folders; hostile archives refused as a whole."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

from simserver.domain_config import Limits
from simserver.errors import BadArchive, TooLarge
from simserver.ingest import Skipped, count_entries, iter_chunks, read_folder, read_site, read_zip
from tests.unit.conftest import BLUE, DEMO, GREEN, RED, TEST_DATA, make_zip, solid

LIMITS = Limits()
PNG_RED = solid(RED)
PNG_GREEN = solid(GREEN)
WEBP_BLUE = solid(BLUE, fmt="WEBP")


def good_entries(prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}shoes/red.png": PNG_RED,
        f"{prefix}shoes/green.png": PNG_GREEN,
        f"{prefix}hats/blue.webp": WEBP_BLUE,
        f"{prefix}hats/photo.webp": (TEST_DATA / "hammer1.webp").read_bytes(),
        f"{prefix}hats/more/nested.png": PNG_RED,  # deeper folders keep the top category
    }


# -- good archives ---------------------------------------------------------------------------------


def test_good_zip_gives_samples_and_labels():
    ds = read_zip(make_zip(good_entries()), LIMITS)
    assert ds.skipped == []
    assert ds.labels() == {"hats": 3, "shoes": 2}
    by_name = {s.name: s for s in ds.samples}
    assert set(by_name) == set(good_entries())
    assert by_name["shoes/red.png"].label == "shoes"
    assert by_name["hats/more/nested.png"].label == "hats"
    assert by_name["shoes/red.png"].data == PNG_RED
    assert by_name["shoes/red.png"].media_type == "image/png"
    assert by_name["hats/blue.webp"].media_type == "image/webp"
    for s in ds.samples:
        assert s.pixels.shape == (224, 224, 3) and s.pixels.dtype == np.uint8
        assert s.metadata == {}
    assert np.all(by_name["shoes/red.png"].pixels == np.array(RED, dtype=np.uint8))


def test_image_size_argument_is_used():
    ds = read_zip(make_zip(good_entries()), LIMITS, image_size=64)
    assert all(s.pixels.shape == (64, 64, 3) for s in ds.samples)


def test_single_wrapper_folder_is_stripped():
    ds = read_zip(make_zip(good_entries("my-dataset/")), LIMITS)
    assert ds.labels() == {"hats": 3, "shoes": 2}
    assert {s.name for s in ds.samples} == set(good_entries())


def test_macos_zip_with_wrapper_and_resource_forks():
    entries = {"wrap/": b"", "wrap/shoes/": b"", **good_entries("wrap/")}
    entries.update(
        {
            "__MACOSX/wrap/shoes/._red.png": b"\x00\x05\x16\x07junk",
            "__MACOSX/wrap/shoes/red.png": PNG_RED,  # the whole folder is ignored, not only dot files
            "wrap/shoes/.DS_Store": b"\x00\x00\x00\x01Bud1",
            "wrap/.DS_Store": b"\x00\x00\x00\x01Bud1",
            "wrap/hats/Thumbs.db": b"junk",
        }
    )
    ds = read_zip(make_zip(entries), LIMITS)
    assert ds.labels() == {"hats": 3, "shoes": 2}
    assert ds.skipped == []  # ignored, not even reported


def test_nested_wrappers_are_all_stripped():
    ds = read_zip(make_zip(good_entries("a/b/")), LIMITS)
    assert ds.labels() == {"hats": 3, "shoes": 2}


def test_single_category_is_not_mistaken_for_a_wrapper():
    ds = read_zip(make_zip({"shoes/red.png": PNG_RED, "shoes/green.png": PNG_GREEN}), LIMITS)
    assert ds.labels() == {"shoes": 2}


def test_files_at_the_root_are_skipped_and_reported():
    ds = read_zip(make_zip({**good_entries(), "README.txt": b"hello", "loose.png": PNG_RED}), LIMITS)
    assert ds.labels() == {"hats": 3, "shoes": 2}
    assert sorted(ds.skipped, key=lambda s: s.name) == [
        Skipped(name="README.txt", reason="not inside a category folder"),
        Skipped(name="loose.png", reason="not inside a category folder"),
    ]


def test_corrupt_image_is_skipped_with_reason():
    truncated = PNG_RED[: len(PNG_RED) // 2]
    entries = {**good_entries(), "shoes/broken.png": truncated, "hats/notes.txt": b"not an image at all"}
    ds = read_zip(make_zip(entries), LIMITS)
    assert ds.labels() == {"hats": 3, "shoes": 2}
    reasons = {s.name: s.reason for s in ds.skipped}
    assert set(reasons) == {"shoes/broken.png", "hats/notes.txt"}
    assert "truncated" in reasons["shoes/broken.png"]
    assert "not an image" in reasons["hats/notes.txt"]
    assert not any(r.startswith("shoes/") or r.startswith("hats/") for r in reasons.values())


def test_progress_is_reported_per_image():
    calls = []
    entries = {**good_entries(), "shoes/broken.png": b"junk"}
    read_zip(make_zip(entries), LIMITS, progress=calls.append)
    assert sum(calls) == len(entries)


# -- metadata.csv ----------------------------------------------------------------------------------


def test_metadata_by_full_name_and_unique_basename():
    csv = (
        "filename,sku,price\n"
        "shoes/red.png,SKU-1,10\n"  # full name
        "blue.webp,SKU-2,20\n"  # unique basename
        "./shoes/green.png,SKU-3,\n"  # leading ./ tolerated, empty value kept
        "missing.png,SKU-9,99\n"  # no such image: ignored
    )
    ds = read_zip(make_zip({**good_entries(), "metadata.csv": csv.encode()}), LIMITS)
    meta = {s.name: s.metadata for s in ds.samples}
    assert meta["shoes/red.png"] == {"sku": "SKU-1", "price": "10"}
    assert meta["hats/blue.webp"] == {"sku": "SKU-2", "price": "20"}
    assert meta["shoes/green.png"] == {"sku": "SKU-3", "price": ""}
    assert meta["hats/photo.webp"] == {}
    assert ds.skipped == []  # metadata.csv is not an image to skip


def test_ambiguous_basename_gets_no_metadata():
    entries = {"a/same.png": PNG_RED, "b/same.png": PNG_GREEN, "metadata.csv": b"filename,sku\nsame.png,X\n"}
    ds = read_zip(make_zip(entries), LIMITS)
    assert all(s.metadata == {} for s in ds.samples)


def test_full_name_wins_over_basename():
    entries = {
        "a/same.png": PNG_RED,
        "b/same.png": PNG_GREEN,
        "metadata.csv": b"filename,sku\nsame.png,X\nb/same.png,Y\n",
    }
    meta = {s.name: s.metadata for s in read_zip(make_zip(entries), LIMITS).samples}
    assert meta == {"a/same.png": {}, "b/same.png": {"sku": "Y"}}


@pytest.mark.parametrize(
    "csv, words",
    [
        (b'filename,sku\nshoes/red.png,"A1\nshoes/blue.png,B2\n', ["malformed csv", "line"]),  # open quote
        (b'filename,sku\nshoes/red.png,"A"1\n', ["malformed csv"]),  # text after a closing quote
        (b"filename,sku\nshoes/red.png," + b"x" * 200_000 + b"\n", ["malformed csv", "field"]),  # huge cell
        (b"filename,sku\nshoes/red.png,\xff\xfe\n", ["utf-8"]),
    ],
)
def test_broken_metadata_csv_refuses_the_archive_with_its_reason(csv, words):
    with pytest.raises(BadArchive) as err:
        read_zip(make_zip({**good_entries(), "metadata.csv": csv}), LIMITS)
    for w in words:
        assert w in err.value.message.lower(), err.value.message


def test_metadata_inside_wrapper_and_with_excel_bom():
    csv = "filename,colour\nshoes/red.png,red\n".encode("utf-8-sig")
    ds = read_zip(make_zip({**good_entries("wrap/"), "wrap/metadata.csv": csv}), LIMITS)
    meta = {s.name: s.metadata for s in ds.samples}
    assert meta["shoes/red.png"] == {"colour": "red"}


def test_metadata_without_filename_column_is_refused():
    entries = {**good_entries(), "metadata.csv": b"name,sku\nshoes/red.png,X\n"}
    with pytest.raises(BadArchive, match="filename"):
        read_zip(make_zip(entries), LIMITS)


def test_metadata_not_utf8_is_refused():
    entries = {**good_entries(), "metadata.csv": "filename,note\nshoes/red.png,caf\xe9\n".encode("latin-1")}
    with pytest.raises(BadArchive, match="metadata.csv"):
        read_zip(make_zip(entries), LIMITS)


# -- refused archives ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"PK\x03\x04 definitely not a zip", b"\x89PNG\r\n\x1a\n" + b"0" * 100],
    ids=["empty", "fake-zip", "png"],
)
def test_not_a_zip(data):
    with pytest.raises(BadArchive) as info:
        read_zip(data, LIMITS)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "name", ["../x.png", "cat/../../x.png", "/abs.png", "/cat/abs.png", "C:\\x.png", "cat\\x.png", "C:x.png"]
)
def test_path_traversal_entries_refuse_the_archive(name):
    with pytest.raises(BadArchive) as info:
        read_zip(make_zip({**good_entries(), name: PNG_RED}), LIMITS)
    assert repr(name) in info.value.message


def test_symlink_entry_refuses_the_archive():
    link = zipfile.ZipInfo("shoes/link.png")
    link.create_system = 3
    link.external_attr = 0o120777 << 16
    data = make_zip([*good_entries().items(), (link, b"/etc/passwd")])
    with pytest.raises(BadArchive, match="symbolic link") as info:
        read_zip(data, LIMITS)
    assert "shoes/link.png" in info.value.message


def _patch_flags(data: bytes, bit: int) -> bytes:
    """Set a general-purpose flag bit in every local and central header."""
    buf = bytearray(data)
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = buf.find(sig)
        while pos >= 0:
            (flags,) = struct.unpack_from("<H", buf, pos + offset)
            struct.pack_into("<H", buf, pos + offset, flags | bit)
            pos = buf.find(sig, pos + 4)
    return bytes(buf)


def test_encrypted_entry_refuses_the_archive():
    data = _patch_flags(make_zip({"shoes/red.png": PNG_RED, "shoes/green.png": PNG_GREEN}), 0x1)
    with pytest.raises(BadArchive, match="encrypted"):
        read_zip(data, LIMITS)


def test_entry_larger_than_its_header_says_is_refused():
    data = bytearray(make_zip({"shoes/red.png": PNG_RED, "shoes/green.png": PNG_GREEN}))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("shoes/red.png")
    struct.pack_into("<I", data, info.header_offset + 22, 10)  # local header: uncompressed size
    central = bytes(data).find(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 10)  # central directory: uncompressed size
    with pytest.raises(BadArchive, match="shoes/red.png"):
        read_zip(bytes(data), LIMITS)


def test_too_many_entries():
    entries = good_entries()
    with pytest.raises(TooLarge, match="5 files") as info:
        read_zip(make_zip(entries), Limits(max_entries=len(entries) - 1))
    assert info.value.status == 413
    assert len(read_zip(make_zip(entries), Limits(max_entries=len(entries))).samples) == len(entries)


def test_too_many_uncompressed_bytes():
    entries = good_entries()
    total = sum(len(v) for v in entries.values())
    with pytest.raises(TooLarge, match=str(total)):
        read_zip(make_zip(entries), Limits(max_uncompressed_bytes=total - 1))
    ds = read_zip(make_zip(entries), Limits(max_uncompressed_bytes=total))
    assert ds.labels() == {"hats": 3, "shoes": 2}


def test_zip_bomb_is_refused_before_reading():
    bomb = make_zip({"shoes/a.png": PNG_RED, "shoes/zeros.png": b"\0" * 20_000_000})
    assert len(bomb) < 100_000
    with pytest.raises(TooLarge, match="expands to"):
        read_zip(bomb, Limits(max_uncompressed_bytes=10_000_000))


def test_upload_size_limit():
    data = make_zip(good_entries())
    with pytest.raises(TooLarge):
        read_zip(data, Limits(max_upload_bytes=len(data) - 1))


def test_oversized_image_refuses_the_whole_archive():
    big = solid(RED, size=(400, 200))  # 80000 pixels; the largest good entry has 68160
    with pytest.raises(TooLarge) as info:
        read_zip(make_zip({**good_entries(), "shoes/big.png": big}), Limits(max_image_pixels=79_999))
    assert "refusing the archive" in info.value.message
    assert "shoes/big.png" in info.value.message


def test_only_non_images_is_bad_archive():
    entries = {"docs/readme.txt": b"hello", "docs/data.json": b"{}"}
    with pytest.raises(BadArchive, match="no usable image"):
        read_zip(make_zip(entries), LIMITS)


def test_only_root_files_is_bad_archive():
    with pytest.raises(BadArchive, match="no usable image"):
        read_zip(make_zip({"a.png": PNG_RED, "b.png": PNG_GREEN}), LIMITS)


# -- folders ---------------------------------------------------------------------------------------


def test_read_folder_on_demo_fashion():
    root = DEMO / "fashion"
    expected = {d.name: sum(1 for f in d.rglob("*") if f.is_file()) for d in root.iterdir() if d.is_dir()}
    ds = read_folder(root, LIMITS)
    assert ds.skipped == []
    assert ds.labels() == dict(sorted(expected.items()))
    assert len(ds.samples) == sum(expected.values())
    assert {s.media_type for s in ds.samples} <= {"image/png", "image/webp"}
    for s in ds.samples:
        assert s.name.split("/")[0] == s.label
        assert s.data == (root / s.name).read_bytes()
    assert all(s.pixels.shape == (224, 224, 3) for s in ds.samples)


def test_read_folder_with_wrapper_hidden_files_and_metadata(tmp_path):
    for name, data in good_entries("wrap/").items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (tmp_path / "wrap/shoes/.DS_Store").write_bytes(b"junk")
    (tmp_path / "wrap/metadata.csv").write_text("filename,sku\nred.png,R\n")
    ds = read_folder(tmp_path, LIMITS)
    assert ds.labels() == {"hats": 3, "shoes": 2}
    assert {s.name: s.metadata for s in ds.samples}["shoes/red.png"] == {"sku": "R"}


def test_read_folder_limits_and_missing(tmp_path):
    with pytest.raises(TooLarge):
        read_folder(DEMO / "fashion", Limits(max_entries=10))
    with pytest.raises(BadArchive):
        read_folder(tmp_path / "nope", LIMITS)


def test_count_entries_and_chunks(tmp_path):
    entries = good_entries()
    zpath = tmp_path / "x.zip"
    zpath.write_bytes(make_zip({"shoes/": b"", **entries}))
    assert count_entries(zpath) == len(entries)
    assert count_entries(DEMO / "fashion") == sum(1 for p in (DEMO / "fashion").rglob("*") if p.is_file())
    assert list(iter_chunks(list(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(iter_chunks([], 3)) == []


# -- per-entry and per-request budgets, before the work (#19) ---------------------------------------


def test_an_entry_larger_than_the_limit_is_refused_from_its_header():
    # A zip bomb: a few KB of deflated zeros that claim 5 MB; refused before anything is inflated.
    data = make_zip({"shoes/zeros.png": b"\0" * 5_000_000, "shoes/red.png": PNG_RED})
    assert len(data) < 20_000
    with pytest.raises(TooLarge, match="per entry"):
        read_zip(data, Limits(max_entry_bytes=1_000_000))


def test_a_site_over_its_pixel_budget_is_refused_before_decoding_any_image(monkeypatch):
    from simserver import ingest

    decoded: list[str] = []
    real_prepare = ingest.prepare
    monkeypatch.setattr(
        ingest, "prepare", lambda data, *a, **k: decoded.append(a[2]) or real_prepare(data, *a, **k)
    )
    files = [(f"img{i}.png", solid(RED, size=(100, 100))) for i in range(5)]
    with pytest.raises(TooLarge, match="pixels in all"):
        read_site(None, files, Limits(max_request_pixels=25_000))
    assert decoded == []  # refused from the headers, before any image was decoded
    # Within the budget: all five.
    assert len(read_site(None, files, Limits(max_request_pixels=50_000)).samples) == 5


def test_a_sites_pixel_budget_counts_archive_entries_and_files_together():
    archive = make_zip({f"site/{i}.png": solid(RED, size=(100, 100)) for i in range(2)})
    files = [("extra.png", solid(RED, size=(100, 100)))]
    with pytest.raises(TooLarge, match="pixels in all"):
        read_site(archive, files, Limits(max_request_pixels=25_000))
