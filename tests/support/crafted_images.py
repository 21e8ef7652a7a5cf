"""Crafted images for the hostile-input tests: valid files of any size made in a fraction of a second."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
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


def phone_photo(size: int, *, width: int = 2000, height: int = 1500, seed: int = 0) -> bytes:
    """A real JPEG of exactly `size` bytes: a sample scaled up to a photo's dimensions with sensor noise, padded
    with comment segments (as a phone's metadata pads its photos) up to `size`."""
    from conftest import REPO

    sample = Image.open(os.path.join(REPO, "samples", "fashion-mnist", "test-00000-ankle-boot.png")).convert("RGB")
    pixels = np.asarray(sample.resize((width, height)), dtype=np.int16)
    noisy = pixels + np.random.default_rng(seed).integers(-24, 25, pixels.shape)
    out = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
    jpeg = out.getvalue()
    padding = size - len(jpeg)
    if padding < 0:
        raise ValueError(f"a {width}x{height} photo is {len(jpeg):,} bytes, over {size:,}")
    segments = []
    while padding:
        if padding < 4:
            raise ValueError(f"{padding} bytes are too few for a comment segment: ask for another size")
        n = min(padding, 65535 + 2)  # a segment: marker (2), length (2, counting itself), data
        if 0 < padding - n < 4:  # the rest would be too short for a segment of its own
            n -= 4
        segments.append(b"\xff\xfe" + (n - 2).to_bytes(2, "big") + b"\x00" * (n - 4))
        padding -= n
    return jpeg[:2] + b"".join(segments) + jpeg[2:]
