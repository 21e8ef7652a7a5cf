"""EXIF orientation read with bounded work agrees with Pillow's full parse, and a flood of entries costs nothing."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from service.exif import MAX_ENTRIES, exif_orientation, upright


def _asymmetric() -> Image.Image:
    arr = np.zeros((6, 10, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)
    arr[1, 7] = (0, 255, 0)
    arr[5, 2] = (0, 0, 255)
    return Image.fromarray(arr)


def _encoded(fmt: str, orientation: int, im: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "camera"  # another tag before and after, as cameras write them
    exif[0x0112] = orientation
    exif[0x0131] = "software"
    buf = io.BytesIO()
    im.save(buf, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_equals_pillows_exif_transpose(fmt, orientation):
    data = _encoded(fmt, orientation, _asymmetric())
    ours = Image.open(io.BytesIO(data))
    ours.load()
    theirs = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    turned = upright(ours)
    assert turned.size == theirs.size
    assert np.array_equal(np.asarray(turned), np.asarray(theirs))
    if orientation in (5, 6, 7, 8):
        assert turned.size == (6, 10)  # a quarter turn swaps width and height


def test_xmp_orientation_is_used_when_exif_has_none():
    im = _asymmetric()
    im.info["xmp"] = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    assert upright(im).size == (6, 10)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"Exif\x00\x00",
        b"II*\x00",
        b"XX*\x00\x08\x00\x00\x00",
        b"II*\x00\xff\xff\xff\xff",
        b"MM\x00*\x00\x00\x00\x08\x00",
    ],
)
def test_malformed_blocks_have_no_orientation(raw):
    assert exif_orientation(raw) is None


def test_an_entry_flood_is_read_only_up_to_its_bound_and_without_warnings():
    n = 20000
    entries = b"".join(struct.pack("<HHII", 1000 + i, 7, 100, 8) for i in range(n))
    raw = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", n) + entries + struct.pack("<I", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert exif_orientation(raw) is None
    # past MAX_ENTRIES nothing is read: the same answer for an orientation hidden behind the flood
    hidden = raw[:10] + entries[: 12 * MAX_ENTRIES] + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)
    assert exif_orientation(hidden[:8] + struct.pack("<H", MAX_ENTRIES + 1) + hidden[10:]) is None
    within = raw[:8] + struct.pack("<H", MAX_ENTRIES) + entries[: 12 * (MAX_ENTRIES - 1)]
    assert exif_orientation(within + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)) == 6
