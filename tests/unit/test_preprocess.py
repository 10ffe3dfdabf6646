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
