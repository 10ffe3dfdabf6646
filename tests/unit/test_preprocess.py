"""simserver.preprocess: untrusted bytes -> uint8 [224, 224, 3], white padding, clear errors."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from simserver.errors import BadImage, TooLarge
from simserver.preprocess import open_image, prepare
from tests.unit.conftest import BLACK, BLUE, DEMO, RED, TEST_DATA, WHITE, encode, solid

SIZE = 224
BIG = 10**8


def close(pixel, color, tol: int = 12) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(color, dtype=int)) <= tol))


def check_output(arr: np.ndarray) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (SIZE, SIZE, 3)
    assert arr.dtype == np.uint8


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


# -- EXIF orientation ------------------------------------------------------------------------------


def _landscape_with_red_top_left() -> Image.Image:
    img = Image.new("RGB", (200, 100), WHITE)
    ImageDraw.Draw(img).rectangle((0, 0, 39, 29), fill=RED)
    return img


def test_exif_orientation_6_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(_landscape_with_red_top_left(), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    out = prepare(data, SIZE, BIG, "query")
    check_output(out)
    # Displayed upright the image is 100x200 (portrait) and the red corner is at the top right.
    # Padded to 200x200 the content spans x in [50, 150) -> [56, 168) after resizing to 224.
    assert close(out[20, 150], RED, 40), out[20, 150]
    # Where the red corner would be without the rotation (left pad area) and with the opposite one.
    assert close(out[70, 20], WHITE), out[70, 20]
    assert close(out[200, 70], WHITE), out[200, 70]
    # Portrait content: left and right margins are white padding, top and bottom rows are content.
    assert close(out[112, 5], WHITE) and close(out[112, 218], WHITE)


def test_exif_rotation_matches_an_upright_image():
    exif = Image.Exif()
    exif[0x0112] = 6
    src = _landscape_with_red_top_left()
    tagged = prepare(encode(src, "JPEG", quality=95, subsampling=0, exif=exif.tobytes()), SIZE, BIG)
    upright = prepare(encode(src.transpose(Image.Transpose.ROTATE_270), "PNG"), SIZE, BIG)
    unrotated = prepare(encode(src, "PNG"), SIZE, BIG)
    diff_upright = np.abs(tagged.astype(int) - upright).mean()
    diff_unrotated = np.abs(tagged.astype(int) - unrotated).mean()
    assert diff_upright < 3
    assert diff_unrotated > 10 * diff_upright


# -- modes -----------------------------------------------------------------------------------------


def _palette_half_transparent() -> bytes:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    ImageDraw.Draw(img).rectangle((16, 0, 31, 31), fill=1)
    return encode(img, "PNG", transparency=0)


def _rgba_half_transparent() -> bytes:
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle((16, 0, 31, 31), fill=BLUE + (255,))
    return encode(img, "PNG")


def _la_half_transparent() -> bytes:
    img = Image.new("LA", (32, 32), (0, 0))
    ImageDraw.Draw(img).rectangle((16, 0, 31, 31), fill=(0, 255))
    return encode(img, "PNG")


def _bilevel_half_white() -> bytes:
    img = Image.new("1", (32, 32), 0)
    ImageDraw.Draw(img).rectangle((16, 0, 31, 31), fill=1)
    return encode(img, "PNG")


def _cmyk_red_jpeg() -> bytes:
    return encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)


def _grey16(value: int) -> bytes:
    return encode(Image.fromarray(np.full((32, 32), value, dtype=np.uint16)), "PNG")


# (builder, expected mode when opened, colour at the left, colour at the right)
MODE_CASES = {
    "L": (lambda: solid(100, mode="L"), "L", (100,) * 3, (100,) * 3),
    "P+transparency": (_palette_half_transparent, "P", WHITE, RED),
    "RGBA": (_rgba_half_transparent, "RGBA", WHITE, BLUE),
    "LA": (_la_half_transparent, "LA", WHITE, BLACK),
    "CMYK": (_cmyk_red_jpeg, "CMYK", RED, RED),
    "I;16": (lambda: _grey16(32768), "I;16", (128,) * 3, (128,) * 3),
    "1": (_bilevel_half_white, "1", BLACK, WHITE),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_mode_becomes_rgb_uint8(case):
    build, mode, left, right = MODE_CASES[case]
    data = build()
    assert Image.open(io.BytesIO(data)).mode == mode  # the test really exercises `mode`
    out = prepare(data, SIZE, BIG, "image")
    check_output(out)
    assert close(out[112, 40], left, 15), out[112, 40]
    assert close(out[112, 184], right, 15), out[112, 184]


def test_sixteen_bit_grey_uses_the_full_range():
    assert close(prepare(_grey16(0), SIZE, BIG)[112, 112], BLACK, 1)
    assert close(prepare(_grey16(65535), SIZE, BIG)[112, 112], WHITE, 1)
    assert close(prepare(_grey16(16384), SIZE, BIG)[112, 112], (64,) * 3, 1)


def test_semi_transparent_pixels_are_composited_on_white():
    out = prepare(solid((255, 0, 0, 128), mode="RGBA"), SIZE, BIG)
    assert close(out[112, 112], (255, 127, 127), 3), out[112, 112]


def test_transparent_demo_emoji_get_white_corners():
    files = sorted(p for p in DEMO.glob("*/*/*") if p.suffix in (".png", ".webp"))
    checked = 0
    for path in files[::15]:
        img = Image.open(path)
        if img.mode not in ("RGBA", "LA") or img.convert("RGBA").getpixel((0, 0))[3] != 0:
            continue
        out = prepare(path.read_bytes(), SIZE, BIG, path.name)
        check_output(out)
        assert tuple(out[0, 0]) == WHITE, path
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("path", sorted(TEST_DATA.glob("*.webp")), ids=lambda p: p.name)
def test_real_photos(path):
    out = prepare(path.read_bytes(), SIZE, BIG, path.name)
    check_output(out)
    assert out.std() > 10  # real content, not a blank canvas


# -- padding ---------------------------------------------------------------------------------------


def test_landscape_is_padded_top_and_bottom_with_white():
    out = prepare(solid(BLUE, size=(100, 50)), SIZE, BIG)
    check_output(out)
    assert close(out[5, 112], WHITE) and close(out[218, 112], WHITE)
    assert close(out[112, 2], BLUE) and close(out[112, 221], BLUE)  # full width kept, no crop


def test_portrait_is_padded_left_and_right_with_white():
    out = prepare(solid(BLUE, size=(50, 100)), SIZE, BIG)
    assert close(out[112, 5], WHITE) and close(out[112, 218], WHITE)
    assert close(out[2, 112], BLUE) and close(out[221, 112], BLUE)


def test_square_image_is_only_resized():
    out = prepare(solid(RED, size=(500, 500)), SIZE, BIG)
    assert np.all(out == np.array(RED, dtype=np.uint8))


def test_output_size_follows_the_argument():
    assert prepare(solid(RED), 96, BIG).shape == (96, 96, 3)


# -- errors ----------------------------------------------------------------------------------------


def _truncated_png() -> bytes:
    data = encode(Image.open(TEST_DATA / "hammer1.webp"), "PNG")
    return data[: len(data) // 2]


def _truncated_jpeg() -> bytes:
    data = encode(Image.open(TEST_DATA / "scissors1.webp").convert("RGB"), "JPEG")
    return data[: len(data) // 2]


BAD_INPUTS = {
    "empty": (lambda: b"", "empty"),
    "random": (lambda: os.urandom(2048), "not an image"),
    "text": (lambda: b"hello, this is not a picture\n" * 10, "not an image"),
    "truncated-png": (_truncated_png, "truncated"),
    "truncated-jpeg": (_truncated_jpeg, "truncated"),
    "png-header-no-data": (lambda: png_header_only(10, 10), ""),
    "jpeg-header-only": (lambda: _truncated_jpeg()[:200], ""),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_bytes_raise_bad_image_naming_the_field(case):
    build, words = BAD_INPUTS[case]
    with pytest.raises(BadImage) as info:
        prepare(build(), SIZE, BIG, "query_image")
    assert info.value.message.startswith("query_image: ")
    assert words in info.value.message
    assert info.value.status == 400


def test_claimed_huge_size_is_refused_before_decoding():
    data = png_header_only(100_000, 100_000)  # 10^10 pixels claimed in a ~60-byte file
    assert len(data) < 100
    with pytest.raises(TooLarge) as info:
        prepare(data, SIZE, 40_000_000, "upload")
    msg = info.value.message
    assert msg.startswith("upload: ") and "100000x100000" in msg and "40000000" in msg
    assert info.value.status == 413


def test_max_pixels_boundary():
    img = Image.open(TEST_DATA / "hammer1.webp")
    data = (TEST_DATA / "hammer1.webp").read_bytes()
    pixels = img.width * img.height
    check_output(prepare(data, SIZE, pixels, "img"))  # exactly at the limit is allowed
    with pytest.raises(TooLarge, match=r"^img: "):
        prepare(data, SIZE, pixels - 1, "img")


def test_open_image_returns_loaded_image():
    img = open_image(solid(RED, size=(7, 5)), BIG)
    assert img.size == (7, 5)


# -- memory bounded before and during decoding (#19) ------------------------------------------------

_PEAK_SCRIPT = """
import resource, sys
from simserver.preprocess import prepare
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare(data, 224, 40_000_000)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def _peak_mb(tmp_path, data: bytes) -> int:
    """Peak RSS that one prepare() adds, in a fresh interpreter (ru_maxrss never goes down)."""
    import subprocess
    import sys

    path = tmp_path / "image"
    path.write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.parametrize("mode", ["I;16", "RGBA"])
def test_a_small_file_of_40_megapixels_costs_little_memory(tmp_path, mode):
    # The outside test's finding: a 77 KB 16-bit PNG of 6300x6300 added ~1.0 GB to one search (a
    # float64 copy and its temporaries); an RGBA one 0.76 GB (full-size composited copies).
    img = Image.new(mode, (6300, 6300)) if mode == "I;16" else Image.new(mode, (6300, 6300), (9, 9, 9, 9))
    data = encode(img, "PNG")
    assert len(data) < 200_000
    decoded = 6300 * 6300 * (2 if mode == "I;16" else 4) // 2**20
    assert _peak_mb(tmp_path, data) < decoded + 60


def test_decoded_size_is_refused_from_the_header():
    # 6000x6000 RGBA: under the pixel limit, 137 MiB decoded; refused with no pixel data read.
    with pytest.raises(TooLarge, match="decodes to"):
        prepare(png_header_only(6000, 6000), SIZE, BIG, "query", max_decoded_bytes=100 * 2**20)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "I;16", "P"])
def test_the_strip_path_gives_the_direct_paths_pixels(monkeypatch, mode):
    # Oracle: the same image through the direct path (whole image converted, then resized).
    from simserver import preprocess

    rng = np.random.default_rng(1)
    small = Image.fromarray((rng.random((30, 45, 3)) * 255).astype(np.uint8))
    big = small.resize((1350, 900), Image.Resampling.BILINEAR)
    if mode == "I;16":
        big = Image.fromarray(np.asarray(big.convert("L")).astype(np.uint16) * 257)
    elif mode == "P":
        big = big.convert("P")
    elif mode != "RGB":
        big = big.convert(mode)
        big.putalpha(Image.new("L", big.size, 100))
    data = encode(big, "PNG")
    direct = prepare(data, SIZE, BIG)
    monkeypatch.setattr(preprocess, "LEAN_ABOVE_BYTES", 0)
    monkeypatch.setattr(preprocess, "STRIP_BYTES", 40_000)  # many strips
    lean = prepare(data, SIZE, BIG)
    assert np.abs(lean.astype(int) - direct).max() <= 1


def test_a_large_jpeg_is_decoded_at_reduced_scale(monkeypatch):
    from simserver import preprocess

    src = _landscape_with_red_top_left().resize((4000, 2000))
    data = encode(src, "JPEG", quality=95)
    full = prepare(data, SIZE, BIG)
    monkeypatch.setattr(preprocess, "LEAN_ABOVE_BYTES", 0)
    img = open_image(data, BIG, target=SIZE)
    assert img.size[0] < 4000 and img.size[0] >= 2 * SIZE  # DCT-scaled, still twice the target
    reduced = prepare(data, SIZE, BIG)
    assert np.abs(reduced.astype(int) - full).mean() < 2


def test_exif_orientation_is_applied_on_the_strip_path(monkeypatch):
    from simserver import preprocess

    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(_landscape_with_red_top_left(), "PNG", exif=exif.tobytes())
    direct = prepare(data, SIZE, BIG)
    monkeypatch.setattr(preprocess, "LEAN_ABOVE_BYTES", 0)
    assert np.abs(prepare(data, SIZE, BIG).astype(int) - direct).max() <= 1
