"""`check_png` on real MNIST digits: what is kept, what is converted, and why the rest is rejected.

Every case starts from a real digit of the embedded sample, re-encoded with Pillow or
rebuilt chunk by chunk (with valid CRCs, so that only the property under test is wrong).
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from tfrecord_builder.png import PNG_SIGNATURE, CheckedImage, ImageRejected, check_png

SIZE = 28
MAX_PIXELS = 4096 * 4096  # BuildConfig's default


# --- helpers -------------------------------------------------------------------------------------


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """(kind, body, offset) of every chunk of a well-formed PNG."""
    out, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length], pos))
        pos += 12 + length
    return out


def assemble(*parts: bytes) -> bytes:
    return PNG_SIGNATURE + b"".join(parts)


def ihdr(width, height, depth=8, color_type=0, interlace=0, compression=0, filter_method=0) -> bytes:
    fields = struct.pack(">IIBBBBB", width, height, depth, color_type, compression, filter_method, interlace)
    return chunk(b"IHDR", fields)


def raw_png(pixels: np.ndarray, depth=8, color_type=0, interlace=0, extra=(), **ihdr_fields) -> bytes:
    """A PNG built by hand from a 2-D array of samples (gray or palette indices), filter type 0."""
    height, width = pixels.shape

    def scanlines(block: np.ndarray) -> bytes:
        rows = []
        for row in block:
            if depth == 16:
                packed = row.astype(">u2").tobytes()
            elif depth == 8:
                packed = row.astype(np.uint8).tobytes()
            else:  # 1, 2, 4 bits per sample, packed MSB first
                bits = np.unpackbits(row.astype(np.uint8)[:, None], axis=1)[:, 8 - depth :]
                packed = np.packbits(bits.ravel()).tobytes()
            rows.append(b"\x00" + packed)
        return b"".join(rows)

    if interlace:
        adam7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
        stream = b"".join(
            scanlines(pixels[y0::dy, x0::dx]) for x0, y0, dx, dy in adam7 if pixels[y0::dy, x0::dx].size
        )
    else:
        stream = scanlines(pixels)
    return assemble(
        ihdr(width, height, depth, color_type, interlace, **ihdr_fields),
        *extra,
        chunk(b"IDAT", zlib.compress(stream)),
        chunk(b"IEND", b""),
    )


def pillow_png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "L", f"stored PNGs must be 8-bit grayscale, got {image.mode}"
        return np.asarray(image).copy()


def rejected(data: bytes, expected_size=SIZE, max_pixels=MAX_PIXELS) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        check_png(data, expected_size, max_pixels)
    return info.value


def with_idat_body(png: bytes, body: bytes) -> bytes:
    """The same PNG with its (single) IDAT chunk's content replaced, CRC recomputed."""
    parts = [chunk(kind, body if kind == b"IDAT" else old) for kind, old, _ in chunks(png)]
    return assemble(*parts)


@pytest.fixture(scope="module")
def digit_png(sample_tree) -> bytes:
    """A real MNIST PNG as the sample ships it: 28x28, 8-bit gray, one IDAT."""
    return sorted((sample_tree / "training" / "3").iterdir())[0].read_bytes()


@pytest.fixture(scope="module")
def digit(digit_png) -> np.ndarray:
    return decode(digit_png)


# --- kept as they are -----------------------------------------------------------------------------


def test_gray8_digit_is_kept_byte_for_byte(digit_png, digit):
    checked = check_png(digit_png, SIZE, MAX_PIXELS)
    assert checked == CheckedImage(png=digit_png, width=SIZE, height=SIZE, converted_from=None)
    assert np.count_nonzero(digit) > 50, "the sample digit should not be blank"


def test_any_size_is_accepted_without_expected_size(digit):
    image = Image.fromarray(digit).resize((40, 30))
    data = pillow_png(image)
    checked = check_png(data, None, MAX_PIXELS)
    assert (checked.width, checked.height, checked.converted_from) == (40, 30, None)
    assert checked.png == data
    # ... but the same image is the wrong size for 28x28 digits.
    error = rejected(data)
    assert error.reason == "wrong_size" and "40x30" in error.detail and "28x28" in error.detail


# --- converted to 8-bit gray ----------------------------------------------------------------------


def assert_normalised(checked: CheckedImage, converted_from: str) -> np.ndarray:
    """The stored PNG is 8-bit gray, non-interlaced, and itself passes unchanged."""
    assert checked.converted_from == converted_from
    assert (checked.width, checked.height) == (SIZE, SIZE)
    assert checked.png.startswith(PNG_SIGNATURE)
    again = check_png(checked.png, SIZE, MAX_PIXELS)
    assert again.converted_from is None and again.png == checked.png
    return decode(checked.png)


def test_rgb_is_converted_to_the_same_gray_digit(digit):
    data = pillow_png(Image.fromarray(digit).convert("RGB"))
    pixels = assert_normalised(check_png(data, SIZE, MAX_PIXELS), "RGB 8-bit")
    np.testing.assert_array_equal(pixels, digit)


def test_palette_is_converted_through_the_palette_not_the_indices(digit):
    # Index i holds gray 255 - i, so the raw indices are the negative of the digit.
    palette = bytes(value for i in range(256) for value in (255 - i,) * 3)
    data = raw_png(255 - digit.astype(np.int32), color_type=3, extra=(chunk(b"PLTE", palette),))
    pixels = assert_normalised(check_png(data, SIZE, MAX_PIXELS), "palette 8-bit")
    np.testing.assert_array_equal(pixels, digit)


def test_16_bit_gray_is_scaled_not_clipped(digit):
    wide = digit.astype(np.uint16) * 257  # 0..65535; every non-zero value is over 255
    assert np.count_nonzero((digit > 0) & (digit < 255)) > 10, "the digit needs mid-gray pixels to tell"
    data = raw_png(wide, depth=16)
    pixels = assert_normalised(check_png(data, SIZE, MAX_PIXELS), "gray 16-bit")
    np.testing.assert_array_equal(pixels, wide >> 8)
    np.testing.assert_array_equal(pixels, digit)  # clipping would have made every stroke pixel 255


def test_16_bit_gray_ramp_keeps_every_level():
    ramp = (np.arange(SIZE * SIZE, dtype=np.uint32) * 65535 // (SIZE * SIZE - 1)).reshape(SIZE, SIZE)
    pixels = decode(check_png(raw_png(ramp, depth=16), SIZE, MAX_PIXELS).png)
    np.testing.assert_array_equal(pixels, (ramp >> 8).astype(np.uint8))
    assert pixels[SIZE // 2, 0] == 0x80  # 32811 / 65535 of full scale is mid-gray, not white
    assert len(np.unique(pixels)) == 256


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_low_bit_depth_gray_is_expanded_to_full_range(digit, depth):
    levels = digit >> (8 - depth)  # 0 .. 2**depth - 1
    data = raw_png(levels, depth=depth)
    pixels = assert_normalised(check_png(data, SIZE, MAX_PIXELS), f"gray {depth}-bit")
    np.testing.assert_array_equal(pixels, levels.astype(np.int32) * (255 // (2**depth - 1)))
    assert pixels.max() == 255


def test_pillow_1_bit_digit_is_converted(digit):
    data = pillow_png(Image.fromarray(digit).convert("1"))
    pixels = assert_normalised(check_png(data, SIZE, MAX_PIXELS), "gray 1-bit")
    assert set(np.unique(pixels)) <= {0, 255} and pixels.max() == 255


def test_interlaced_gray_is_deinterlaced(digit):
    data = raw_png(digit, interlace=1)
    assert data[28] == 1, "test setup: IHDR says Adam7"
    checked = check_png(data, SIZE, MAX_PIXELS)
    pixels = assert_normalised(checked, "gray 8-bit interlaced")
    assert checked.png[28] == 0, "the stored PNG must not be interlaced"
    np.testing.assert_array_equal(pixels, digit)


# --- rejected: one test per reason ----------------------------------------------------------------


def test_empty_file():
    error = rejected(b"")
    assert error.reason == "empty_file" and "empty" in error.detail


@pytest.mark.parametrize("fmt, name", [
    ("JPEG", "JPEG"), ("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("WEBP", "WebP"), ("ICO", "ICO"),
])
def test_other_image_formats_under_a_png_name(digit, fmt, name):
    error = rejected(encode(Image.fromarray(digit), fmt))
    assert error.reason == "wrong_format"
    assert name in error.detail and "not PNG" in error.detail


@pytest.mark.parametrize("data", [b"digit three\n", b"<html><body>404</body></html>", b"\x00" * 64])
def test_not_an_image(data):
    error = rejected(data)
    assert error.reason == "not_an_image" and "no PNG signature" in error.detail


def test_crc_mismatch_is_corrupt(digit_png):
    (_, body, offset), = [c for c in chunks(digit_png) if c[0] == b"IDAT"]
    damaged = bytearray(digit_png)
    damaged[offset + 8 + len(body) // 2] ^= 0x01  # one bit flipped inside the IDAT data
    error = rejected(bytes(damaged))
    assert error.reason == "corrupt"
    assert "CRC mismatch in the IDAT chunk" in error.detail


def test_crc_mismatch_in_ihdr_is_corrupt(digit_png):
    damaged = bytearray(digit_png)
    damaged[16 + 3] ^= 0xFF  # width
    error = rejected(bytes(damaged))
    assert error.reason == "corrupt" and "CRC mismatch in the IHDR chunk" in error.detail


def test_wrong_size(digit):
    error = rejected(pillow_png(Image.fromarray(digit).resize((32, 32))))
    assert error.reason == "wrong_size" and "32x32" in error.detail and "expected 28x28" in error.detail


@pytest.mark.parametrize("mode, kind", [("LA", "gray+alpha"), ("RGBA", "RGBA")])
def test_alpha_channel(digit, mode, kind):
    error = rejected(pillow_png(Image.fromarray(digit).convert(mode)))
    assert error.reason == "has_alpha" and error.detail.startswith(kind) and "transparency" in error.detail


@pytest.mark.parametrize("mode, kind", [("L", "gray with tRNS"), ("P", "palette with tRNS")])
def test_trns_transparency(digit, mode, kind):
    error = rejected(pillow_png(Image.fromarray(digit).convert(mode), transparency=0))
    assert error.reason == "has_alpha" and kind in error.detail


# --- truncated files: rejected, never accepted, never another exception ---------------------------


def cut_points(png: bytes) -> dict[str, int]:
    (_, idat, idat_at), = [c for c in chunks(png) if c[0] == b"IDAT"]
    (_, _, iend_at), = [c for c in chunks(png) if c[0] == b"IEND"]
    return {
        "inside the signature": 4,
        "after the signature": 8,
        "inside the IHDR length": 10,
        "inside IHDR": 8 + 8 + 6,
        "inside the IHDR CRC": 8 + 8 + 13 + 2,
        "inside the IDAT header": idat_at + 5,
        "inside IDAT": idat_at + 8 + len(idat) // 2,
        "inside the IDAT CRC": idat_at + 8 + len(idat) + 1,
        "just before IEND": iend_at,
        "inside IEND": iend_at + 6,
        "last byte missing": len(png) - 1,
    }


CUTS = (
    "inside the signature", "after the signature", "inside the IHDR length", "inside IHDR", "inside the IHDR CRC",
    "inside the IDAT header", "inside IDAT", "inside the IDAT CRC", "just before IEND", "inside IEND",
    "last byte missing",
)


@pytest.mark.parametrize("where", CUTS)
@pytest.mark.parametrize("kind", ["gray8", "rgb"])
def test_truncated_file_is_rejected(digit, digit_png, kind, where):
    png = digit_png if kind == "gray8" else pillow_png(Image.fromarray(digit).convert("RGB"))
    cut = cut_points(png)[where]
    error = rejected(png[:cut])  # accepting it, or any other exception type, fails the test
    assert error.reason == "truncated", f"a plain truncation should say so: {error.detail}"
    assert "end" in error.detail or "past" in error.detail


@pytest.mark.parametrize("kind", ["gray8", "rgb", "interlaced"])
def test_every_prefix_is_rejected(digit, digit_png, kind):
    png = {
        "gray8": digit_png,
        "rgb": pillow_png(Image.fromarray(digit).convert("RGB")),
        "interlaced": raw_png(digit, interlace=1),
    }[kind]
    outcomes = {}
    for length in range(1, len(png)):
        try:
            check_png(png[:length], SIZE, MAX_PIXELS)
            outcomes[length] = "accepted"
        except ImageRejected as error:
            outcomes[length] = error.reason
    assert set(outcomes.values()) <= {"truncated", "corrupt"}, {
        n: r for n, r in outcomes.items() if r not in ("truncated", "corrupt")
    }


def test_pixel_stream_cut_short_inside_a_well_formed_chunk(digit_png):
    (_, idat, _), = [c for c in chunks(digit_png) if c[0] == b"IDAT"]
    error = rejected(with_idat_body(digit_png, idat[: len(idat) // 2]))
    assert error.reason == "truncated" and "pixel data stops after" in error.detail


@pytest.mark.parametrize("missing", [1, 4])
def test_pixel_stream_without_its_zlib_checksum_is_rejected(digit_png, missing):
    """All pixels inflate, but the zlib stream's Adler-32 trailer is cut off (chunk CRC recomputed).

    tf.io.decode_png (libpng) refuses such a file ("Invalid PNG data"), so keeping it
    byte-for-byte would crash Transform later.
    """
    (_, idat, _), = [c for c in chunks(digit_png) if c[0] == b"IDAT"]
    error = rejected(with_idat_body(digit_png, idat[:-missing]))
    assert error.reason in ("truncated", "corrupt")


# --- corrupt structure ----------------------------------------------------------------------------


def test_zlib_garbage_in_idat_is_corrupt(digit_png):
    error = rejected(with_idat_body(digit_png, b"this is not deflate data" * 4))
    assert error.reason == "corrupt" and "does not inflate" in error.detail


def test_flipped_pixel_byte_with_valid_crc_fails_the_zlib_checksum(digit_png):
    (_, idat, _), = [c for c in chunks(digit_png) if c[0] == b"IDAT"]
    stream = bytearray(zlib.decompress(idat))
    stream[29 * 14 + 10] ^= 0x40  # a pixel in the middle row
    bad = zlib.compress(bytes(stream))[:-4] + zlib.compress(zlib.decompress(idat))[-4:]  # stale Adler-32
    error = rejected(with_idat_body(digit_png, bad))
    assert error.reason == "corrupt" and "does not inflate" in error.detail


def test_invalid_row_filter_type_is_corrupt(digit):
    stream = bytearray(b"".join(b"\x00" + row.tobytes() for row in digit))
    stream[(SIZE + 1) * 5] = 7  # row 5: filter type 7 does not exist
    png = assemble(ihdr(SIZE, SIZE), chunk(b"IDAT", zlib.compress(bytes(stream))), chunk(b"IEND", b""))
    error = rejected(png)
    assert error.reason == "corrupt" and "filter type" in error.detail


def test_too_much_pixel_data_is_corrupt(digit):
    stream = b"".join(b"\x00" + row.tobytes() for row in digit) + b"\x00" * (SIZE + 1)  # one extra row
    png = assemble(ihdr(SIZE, SIZE), chunk(b"IDAT", zlib.compress(stream)), chunk(b"IEND", b""))
    error = rejected(png)
    assert error.reason == "corrupt" and "pixel data is longer than" in error.detail and str(SIZE * (SIZE + 1)) in error.detail


def test_missing_idat_is_corrupt():
    error = rejected(assemble(ihdr(SIZE, SIZE), chunk(b"IEND", b"")))
    assert error.reason == "corrupt" and "no IDAT" in error.detail


def test_first_chunk_not_ihdr_is_corrupt(digit_png):
    parts = chunks(digit_png)
    reordered = assemble(*(chunk(kind, body) for kind, body, _ in [parts[1], parts[0], *parts[2:]]))
    error = rejected(reordered)
    assert error.reason == "corrupt" and "IHDR" in error.detail


@pytest.mark.parametrize("fields, words", [
    (dict(width=0, height=SIZE), "zero dimension"),
    (dict(width=SIZE, height=SIZE, depth=3), "bit depth 3"),
    (dict(width=SIZE, height=SIZE, color_type=5), "colour type 5"),
    (dict(width=SIZE, height=SIZE, color_type=2, depth=4), "bit depth 4"),
])
def test_invalid_ihdr_is_corrupt(digit_png, fields, words):
    (_, idat, _), = [c for c in chunks(digit_png) if c[0] == b"IDAT"]
    png = assemble(ihdr(**fields), chunk(b"IDAT", idat), chunk(b"IEND", b""))
    error = rejected(png)
    assert error.reason == "corrupt" and words in error.detail


@pytest.mark.parametrize("field", ["compression", "filter_method"])
def test_unknown_ihdr_method_is_corrupt(digit_png, field):
    """PNG defines only method 0; libpng (tf.io.decode_png) refuses anything else."""
    (_, idat, _), = [c for c in chunks(digit_png) if c[0] == b"IDAT"]
    png = assemble(ihdr(SIZE, SIZE, **{field: 1}), chunk(b"IDAT", idat), chunk(b"IEND", b""))
    error = rejected(png)
    assert error.reason == "corrupt"


def test_unknown_interlace_method_is_corrupt(digit_png):
    (_, idat, _), = [c for c in chunks(digit_png) if c[0] == b"IDAT"]
    png = assemble(ihdr(SIZE, SIZE, interlace=2), chunk(b"IDAT", idat), chunk(b"IEND", b""))
    assert rejected(png).reason == "corrupt"


# --- decompression bombs --------------------------------------------------------------------------


@pytest.mark.parametrize("expected_size", [SIZE, None])
@pytest.mark.parametrize("color_type", [0, 2])
def test_huge_header_is_wrong_size_without_allocating(digit_png, expected_size, color_type):
    (_, idat, _), = [c for c in chunks(digit_png) if c[0] == b"IDAT"]
    bomb = assemble(ihdr(100_000, 100_000, color_type=color_type), chunk(b"IDAT", idat), chunk(b"IEND", b""))
    tracemalloc.start()
    try:
        error = rejected(bomb, expected_size=expected_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.reason == "wrong_size" and "100000x100000" in error.detail
    assert peak < 1_000_000, f"a 10-gigapixel header must not be decoded ({peak} bytes allocated)"


def test_header_over_pillows_bomb_limit_with_a_generous_max_pixels_is_rejected(digit):
    """With max_pixels raised (BuildConfig allows any value), Pillow's own limit must not escape as a crash."""
    rgb = pillow_png(Image.fromarray(digit).convert("RGB"))
    parts = chunks(rgb)
    header = bytearray(parts[0][1])
    header[0:8] = struct.pack(">II", 20_000, 20_000)  # 400 Mpixels: over Pillow's 179 Mpixel error limit
    bomb = assemble(chunk(b"IHDR", bytes(header)), *(chunk(kind, body) for kind, body, _ in parts[1:]))
    error = rejected(bomb, expected_size=None, max_pixels=10**9)
    assert error.reason in ("wrong_size", "corrupt")
