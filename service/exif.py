"""An image's EXIF orientation, read from the raw block with bounded work.

Pillow's `ImageOps.exif_transpose` parses the whole first IFD to find one tag. A crafted upload that declares
thousands of entries cost a parse of every one and a warning for each bad one, per request, all on the event
loop for a small file (docs/design.md). Orientation is one SHORT in the first IFD, where cameras write a few
dozen entries: this reads at most `MAX_ENTRIES` of them and never warns. Like Pillow, it falls back to the XMP
packet's `tiff:Orientation` when the EXIF block has none.
"""

from __future__ import annotations

import re
import struct

from PIL import Image

MAX_ENTRIES = 512  # entries of the first IFD examined; cameras write tens
ORIENTATION_TAG = 0x0112
_SHORT = 3
TRANSPOSE = {  # orientation -> the turn that makes the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(?:="|>)([1-8])')


def exif_orientation(raw: bytes | None) -> int | None:
    """The orientation (1..8) in a raw EXIF block (TIFF layout, with or without the JPEG `Exif\\0\\0` prefix);
    None when absent or malformed."""
    if not raw:
        return None
    if raw.startswith(b"Exif\x00\x00"):
        raw = raw[6:]
    endian = {b"II": "<", b"MM": ">"}.get(raw[:2])
    if endian is None or len(raw) < 8:
        return None
    (offset,) = struct.unpack_from(endian + "I", raw, 4)
    if offset + 2 > len(raw):
        return None
    (count,) = struct.unpack_from(endian + "H", raw, offset)
    end = min(offset + 2 + 12 * min(count, MAX_ENTRIES), len(raw) - 11)
    for pos in range(offset + 2, end, 12):
        tag, kind, n = struct.unpack_from(endian + "HHI", raw, pos)
        if tag == ORIENTATION_TAG:
            if kind != _SHORT or n < 1:
                return None
            (value,) = struct.unpack_from(endian + "H", raw, pos + 8)
            return value if 1 <= value <= 8 else None
    return None


def orientation(im: Image.Image) -> int:
    """The loaded image's orientation: EXIF first, then XMP, else 1 (as stored)."""
    value = exif_orientation(im.info.get("exif"))
    if value is None:
        xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
        if isinstance(xmp, str):
            xmp = xmp.encode("utf-8", "replace")
        match = _XMP_ORIENTATION.search(xmp[:1_000_000]) if xmp else None
        value = int(match.group(1)) if match else 1
    return value


def upright(im: Image.Image) -> Image.Image:
    """The image turned as its orientation says (a loaded image; PNG keeps EXIF after the pixels)."""
    op = TRANSPOSE.get(orientation(im))
    return im if op is None else im.transpose(op)
