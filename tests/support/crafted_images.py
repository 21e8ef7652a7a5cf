"""Crafted images for the hostile-input tests: valid files of any size made in a fraction of a second."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def zero_png(width: int, height: int, color_type: int, bit_depth: int) -> bytes:
    """A real PNG of zeros (valid, and as cheap to send as possible), written with zlib so any bit depth and
    colour type can be made in a fraction of a second. Colour type 3 gets a one-entry palette, transparent."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row = 1 + (width * channels * bit_depth + 7) // 8
    rows_per_block = max(1, (4 << 20) // row)
    deflate, parts, left = zlib.compressobj(9), [], height
    while left:
        n = min(rows_per_block, left)
        parts.append(deflate.compress(bytes(row * n)))
        left -= n
    parts.append(deflate.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    palette = chunk(b"PLTE", b"\0\0\0") + chunk(b"tRNS", b"\0") if color_type == 3 else b""
    idat = chunk(b"IDAT", b"".join(parts))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + palette + idat + chunk(b"IEND", b"")


def exif_flood_png(tags: int = 20000) -> bytes:
    """A 28x28 PNG whose EXIF block declares `tags` entries, each pointing past the data: Pillow warns once per
    tag (17,600 warnings for this one)."""
    buf = io.BytesIO()
    Image.new("L", (28, 28), 128).save(buf, "PNG")
    png = buf.getvalue()
    entries = b"".join(struct.pack("<HHII", 1000 + i, 7, 100, 8) for i in range(tags))
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", tags) + entries + struct.pack("<I", 0)
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk(b"eXIf", tiff) + png[end:]
