"""Checks that bytes are a complete, uncorrupted PNG digit and normalises it to 8-bit gray.

The common case (8-bit grayscale, non-interlaced, as MNIST ships) is checked
structurally: every chunk's CRC, IHDR first and IEND last, and the IDAT stream
inflates to exactly one filter byte plus one byte per pixel on every row. That
catches truncated and corrupted files at a fraction of the cost of a full decode.
Everything else goes through Pillow: colour, palette, 16-bit and low-bit-depth
PNGs are converted to 8-bit grayscale; images with transparency are rejected
because the digit's colour against a transparent background is ambiguous.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Other formats someone may have saved under a .png name, by their magic bytes.
_OTHER_FORMATS = (
    (lambda d: d.startswith(b"\xff\xd8\xff"), "JPEG"),
    (lambda d: d[:6] in (b"GIF87a", b"GIF89a"), "GIF"),
    (lambda d: d.startswith(b"BM") and len(d) >= 26 and d[6:10] == b"\x00\x00\x00\x00", "BMP"),
    (lambda d: d[:4] in (b"II*\x00", b"MM\x00*"), "TIFF"),
    (lambda d: d.startswith(b"RIFF") and d[8:12] == b"WEBP", "WebP"),
    (lambda d: d.startswith(b"\x00\x00\x01\x00"), "ICO"),
)

_GRAY, _RGB, _PALETTE, _GRAY_ALPHA, _RGBA = 0, 2, 3, 4, 6
_COLOR_TYPE_NAMES = {_GRAY: "gray", _RGB: "RGB", _PALETTE: "palette", _GRAY_ALPHA: "gray+alpha", _RGBA: "RGBA"}
_VALID_DEPTHS = {_GRAY: (1, 2, 4, 8, 16), _RGB: (8, 16), _PALETTE: (1, 2, 4, 8), _GRAY_ALPHA: (8, 16), _RGBA: (8, 16)}


class ImageRejected(Exception):
    """The bytes cannot become a training example; `reason` is a stable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CheckedImage:
    png: bytes  # the original bytes, or the 8-bit grayscale re-encoding
    width: int
    height: int
    converted_from: str | None  # e.g. "RGB 8-bit"; None when the original bytes are kept


def check_png(data: bytes, expected_size: int | None, max_pixels: int) -> CheckedImage:
    """Validates `data` and returns the PNG to store; raises ImageRejected otherwise.

    `expected_size` is the required width and height (None accepts any size up to
    `max_pixels` pixels).
    """
    if not data:
        raise ImageRejected("empty_file", "file is empty (0 bytes)")
    if not data.startswith(PNG_SIGNATURE):
        for looks_like, name in _OTHER_FORMATS:
            if looks_like(data):
                raise ImageRejected("wrong_format", f"file is {name}, not PNG")
        if PNG_SIGNATURE.startswith(data):
            raise ImageRejected("truncated", f"file ends inside the PNG signature ({len(data)} bytes)")
        raise ImageRejected("not_an_image", "no PNG signature; not an image file")

    header, idat, has_transparency = _read_chunks(data)
    width, height, depth, color_type, compression, filter_method, interlace = header
    if compression != 0 or filter_method != 0 or interlace not in (0, 1):
        raise ImageRejected(
            "corrupt", f"IHDR has unknown methods (compression {compression}, filter {filter_method}, "
            f"interlace {interlace})"
        )
    if width == 0 or height == 0:
        raise ImageRejected("corrupt", f"IHDR has a zero dimension ({width}x{height})")
    if color_type not in _VALID_DEPTHS or depth not in _VALID_DEPTHS[color_type]:
        raise ImageRejected("corrupt", f"IHDR has an invalid colour type {color_type} / bit depth {depth}")
    if width * height > max_pixels:
        raise ImageRejected("wrong_size", f"image is {width}x{height}, over the {max_pixels}-pixel limit")
    if expected_size is not None and (width, height) != (expected_size, expected_size):
        raise ImageRejected("wrong_size", f"image is {width}x{height}, expected {expected_size}x{expected_size}")
    if color_type in (_GRAY_ALPHA, _RGBA) or has_transparency:
        kind = _COLOR_TYPE_NAMES[color_type] + (" with tRNS transparency" if has_transparency else "")
        raise ImageRejected("has_alpha", f"{kind} image: transparency makes the digit ambiguous")

    if color_type == _GRAY and depth == 8 and interlace == 0:
        _check_gray8_pixels(idat, width, height)
        return CheckedImage(png=data, width=width, height=height, converted_from=None)
    converted_from = f"{_COLOR_TYPE_NAMES[color_type]} {depth}-bit" + (" interlaced" if interlace else "")
    return CheckedImage(png=_to_gray8(data), width=width, height=height, converted_from=converted_from)


def _read_chunks(data: bytes) -> tuple[tuple[int, ...], bytes, bool]:
    """Walks the chunk list: (IHDR fields, concatenated IDAT data, has tRNS)."""
    view = memoryview(data)
    size = len(data)
    pos = len(PNG_SIGNATURE)
    header = None
    idat = []
    has_transparency = False
    while True:
        if pos + 8 > size:
            raise ImageRejected("truncated", f"file ends before the IEND chunk ({size} bytes)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > size:
            raise ImageRejected("truncated", f"{kind.decode('latin-1')} chunk runs past the end of the file ({size} bytes)")
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(view[pos + 4 : end]) != crc:
            raise ImageRejected("corrupt", f"CRC mismatch in the {kind.decode('latin-1')} chunk at byte {pos}")
        if header is None:
            if kind != b"IHDR" or length != 13:
                raise ImageRejected("corrupt", "the first chunk is not a 13-byte IHDR")
            header = struct.unpack_from(">IIBBBBB", data, pos + 8)
        elif kind == b"IDAT":
            idat.append(view[pos + 8 : end])
        elif kind == b"tRNS":
            has_transparency = True
        elif kind == b"IEND":
            if not idat:
                raise ImageRejected("corrupt", "PNG has no IDAT (pixel data) chunk")
            return header, b"".join(idat), has_transparency
        pos = end + 4


def _check_gray8_pixels(idat: bytes, width: int, height: int) -> None:
    stride = width + 1  # each row: one filter-type byte, then one byte per pixel
    expected = height * stride
    inflater = zlib.decompressobj()
    try:
        # One byte more than expected, so that an over-long stream is noticed.
        raw = inflater.decompress(idat, expected + 1)
    except zlib.error as error:
        raise ImageRejected("corrupt", f"pixel data does not inflate: {error}") from None
    if len(raw) > expected:
        raise ImageRejected("corrupt", f"pixel data is longer than the {expected} bytes the header implies")
    if len(raw) < expected:
        if inflater.eof:
            raise ImageRejected("corrupt", f"pixel data has {len(raw)} bytes, expected {expected}")
        raise ImageRejected("truncated", f"pixel data stops after {len(raw)} of {expected} bytes")
    if not inflater.eof:
        # Every pixel is there, and all input was consumed, but the zlib stream never ended.
        raise ImageRejected("truncated", "pixel data stream ends before its zlib end and checksum")
    if inflater.unused_data:
        raise ImageRejected("corrupt", f"{len(inflater.unused_data)} stray bytes after the pixel data stream")
    if max(raw[::stride]) > 4:
        raise ImageRejected("corrupt", "pixel data has an invalid row filter type")


def _to_gray8(data: bytes) -> bytes:
    """Decodes any opaque PNG with Pillow and re-encodes it as 8-bit grayscale."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # Pillow's convert("L") clips 16-bit values; scale them instead.
                pixels = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
                gray = Image.fromarray(pixels, mode="L")
            else:
                gray = image.convert("L")
    except Image.DecompressionBombError as error:
        raise ImageRejected("wrong_size", f"image too large for Pillow to decode: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected("corrupt", f"PNG does not decode: {error}") from None
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG")
    return buffer.getvalue()
