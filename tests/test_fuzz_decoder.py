"""Property tests (hypothesis) on the image decoder: whatever the bytes, `decode` returns a tensor of the
checkpoint's input shape or raises `ImageError` with a 4xx status, a code and a message; nothing else escapes.

Inputs are arbitrary bytes, bytes behind a real format's magic number, and real images (the shipped
Fashion-MNIST samples and images made here in every format and many modes) with bits flipped, bytes
overwritten, inserted or deleted, truncated, and header fields (width, height, bit depth, ...) rewritten.
Bounded: a few hundred examples per property, no deadline (the first decodes pay Pillow's plugin imports).
"""

from __future__ import annotations

import glob
import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO
from model import SHIPPED_CHECKPOINT, Preprocessing
from model.checkpoint import read_metadata
from service.imaging import ImageError, decode, decode_opened, open_image
from service.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow, on mangled EXIF

SHIPPED = str(SHIPPED_CHECKPOINT)
_meta = read_metadata(SHIPPED)["preprocessing"]
SERVED = Preprocessing(_meta["image_size"], _meta["channels"], tuple(_meta["mean"]), tuple(_meta["std"]))
RGB = Preprocessing(8, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
MAX_PIXELS = Settings().max_pixels  # the service's own limit
SMALL_LIMIT = 1_000_000  # for mutated headers: a lower limit keeps each example fast; the property is the same

FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible, and a failure reruns identically
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    """Real images in every accepted format (and a few refused ones), small so each decode is quick."""
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: exercises exif_transpose
    frames = [Image.new("L", (12, 12), v) for v in (10, 128, 250)]
    seeds = {
        "png-gray": _encode(gray, "PNG"),
        "png-rgb": _encode(rgb, "PNG"),
        "png-rgba": _encode(rgba, "PNG"),
        "png-palette": _encode(rgb.convert("P"), "PNG"),
        "png-palette-transparent": _encode(rgb.convert("P"), "PNG", transparency=0),
        "png-16bit": _encode(Image.new("I;16", (10, 10), 40000), "PNG"),
        "png-1bit": _encode(gray.convert("1"), "PNG"),
        "png-la": _encode(Image.new("LA", (9, 9), (200, 128)), "PNG"),
        "png-interlaced": _encode(rgb, "PNG", interlace=1),
        "jpeg-gray": _encode(gray, "JPEG", quality=90),
        "jpeg-rgb": _encode(rgb, "JPEG"),
        "jpeg-progressive": _encode(rgb, "JPEG", progressive=True),
        "jpeg-cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg-exif": _encode(rgb, "JPEG", exif=exif),
        "gif": _encode(gray, "GIF"),
        "gif-animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "bmp-gray": _encode(gray, "BMP"),
        "bmp-rgb": _encode(rgb, "BMP"),
        "bmp-1bit": _encode(gray.convert("1"), "BMP"),
        "webp": _encode(rgb, "WEBP", quality=80),
        "webp-lossless": _encode(rgba, "WEBP", lossless=True),
        "tiff": _encode(gray, "TIFF"),  # identified, then refused as an unsupported type (415)
    }
    for path in sorted(glob.glob(os.path.join(REPO, "samples", "fashion-mnist", "*.png")))[:4]:
        with open(path, "rb") as f:
            seeds["sample-" + os.path.basename(path)] = f.read()
    return seeds


SEEDS = _seeds()
SEED_NAMES = sorted(SEEDS)
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"GIF89a", b"GIF87a", b"BM", b"RIFF"]
MAGIC += [b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00", b"P5\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"]


def _check(data: bytes, pre: Preprocessing, max_pixels: int) -> None:
    """The property: a tensor of the checkpoint's input shape and dtype, or an ImageError with a 4xx."""
    try:
        out = decode(data, pre, max_pixels=max_pixels)
    except ImageError as e:
        assert 400 <= e.status < 500, (e.status, e.code, e.message)
        assert e.code and isinstance(e.code, str)
        assert e.message and isinstance(e.message, str)
        return
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.uint8
    assert tuple(out.shape) == (pre.channels, pre.image_size, pre.image_size)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_seeds_decode():
    """Every seed is a real image the decoder takes (or refuses by type), so mutations start from valid bytes."""
    for name, data in SEEDS.items():
        if name == "tiff":
            with pytest.raises(ImageError) as e:
                decode(data, SERVED, max_pixels=MAX_PIXELS)
            assert e.value.status == 415
            continue
        assert decode(data, SERVED, max_pixels=MAX_PIXELS).shape == (SERVED.channels, 28, 28), name
        assert decode(data, RGB, max_pixels=MAX_PIXELS).shape == (3, 8, 8), name


@FUZZ
@given(data=st.binary(max_size=2048))
@example(data=b"")
@example(data=b"\x00")
@example(data=b"\x89PNG\r\n\x1a\n")
def test_arbitrary_bytes(data):
    _check(data, SERVED, MAX_PIXELS)


@FUZZ
@given(magic=st.sampled_from(MAGIC), rest=st.binary(max_size=1024), rgb=st.booleans())
def test_bytes_behind_a_real_magic_number(magic, rest, rgb):
    _check(magic + rest, RGB if rgb else SERVED, SMALL_LIMIT)


# One mutation: (kind, position as a fraction of the length, value).
_MUTATION = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
    st.floats(0, 1, allow_nan=False),
    st.integers(0, 255),
)


def _mutate(data: bytes, mutations: list[tuple[str, float, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, value in mutations:
        if not buf:
            break
        i = min(int(where * len(buf)), len(buf) - 1)
        if kind == "flip":
            buf[i] ^= 1 << (value % 8)
        elif kind == "set":
            buf[i] = value
        elif kind == "insert":
            buf[i:i] = bytes([value]) * (1 + value % 16)
        elif kind == "delete":
            del buf[i : i + 1 + value % 16]
        else:
            del buf[i:]
    return bytes(buf)


@FUZZ
@given(
    name=st.sampled_from(SEED_NAMES),
    mutations=st.lists(_MUTATION, min_size=1, max_size=8),
    rgb=st.booleans(),
)
def test_mutated_real_images(name, mutations, rgb):
    _check(_mutate(SEEDS[name], mutations), RGB if rgb else SERVED, SMALL_LIMIT)


@FUZZ
@given(name=st.sampled_from(SEED_NAMES), keep=st.floats(0, 1, exclude_max=True))
def test_truncated_real_images(name, keep):
    data = SEEDS[name]
    _check(data[: int(keep * len(data))], SERVED, SMALL_LIMIT)


_DIMENSION = st.one_of(
    st.sampled_from([0, 1, 2, 7, 28, 999, 1000, 1001, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)


def _with_size(name: str, data: bytes, width: int, height: int, extra: int) -> bytes:
    """Rewrite the header's width/height (and one other field) of a real image, keeping checksums valid."""
    buf = bytearray(data)
    if name.startswith(("png", "sample")):  # IHDR: width, height (u32 BE), bit depth, colour type, ..., CRC
        ihdr = struct.pack(">II", width, height) + bytes([extra % 256]) + bytes(buf[25:29])
        if extra >= 256:  # sometimes keep the original bit depth / colour type so the size is what changes
            ihdr = struct.pack(">II", width, height) + bytes(buf[24:29])
        return bytes(buf[:8]) + _png_chunk(b"IHDR", ihdr) + bytes(buf[33:])
    if name.startswith("gif"):  # logical screen (u16 LE), then the first image descriptor's size
        buf[6:10] = struct.pack("<HH", width % 65536, height % 65536)
        at = buf.find(b"\x2c", 13)
        if at > 0 and extra % 2:
            buf[at + 5 : at + 9] = struct.pack("<HH", height % 65536, width % 65536)
        return bytes(buf)
    if name.startswith("bmp"):  # BITMAPINFOHEADER: width, height (i32 LE; negative height = top-down), bpp
        h = height % 2**32 - (2**32 if height % 2**32 >= 2**31 else 0)
        w = width % 2**32 - (2**32 if width % 2**32 >= 2**31 else 0)
        buf[18:26] = struct.pack("<ii", w, h)
        if extra < 256:
            buf[28:30] = struct.pack("<H", extra % 65)
        return bytes(buf)
    if name.startswith("jpeg"):  # SOFn: precision, height, width (u16 BE), components
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = buf.find(marker)
            if at > 0:
                buf[at + 5 : at + 9] = struct.pack(">HH", height % 65536, width % 65536)
                if extra < 256:
                    buf[at + 4] = extra
                break
        return bytes(buf)
    if name.startswith("webp"):  # VP8L / VP8 sizes live in the bitstream; overwrite the bytes where they sit
        buf[21:25] = struct.pack("<I", (width * 65537 + height) % 2**32)
        return bytes(buf)
    return bytes(buf)  # tiff: refused by type before its size matters


@FUZZ
@given(name=st.sampled_from(SEED_NAMES), width=_DIMENSION, height=_DIMENSION, extra=st.integers(0, 511))
def test_header_fields_rewritten(name, width, height, extra):
    _check(_with_size(name, SEEDS[name], width, height, extra), SERVED, SMALL_LIMIT)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "JPEG"])
def test_huge_declared_size_is_refused_from_the_header(fmt):
    """A header that claims more pixels than the limit is a 413, whatever (little) data follows."""
    seed = {"PNG": "png-gray", "GIF": "gif", "BMP": "bmp-gray", "JPEG": "jpeg-gray"}[fmt]
    data = _with_size(seed, SEEDS[seed], 60_000, 60_000, 256)
    with pytest.raises(ImageError) as e:
        decode(data, SERVED, max_pixels=MAX_PIXELS)
    assert e.value.status == 413 and e.value.code == "too_many_pixels"


_MODES = ["1", "L", "LA", "P", "P-transparent", "RGB", "RGBA", "I;16", "CMYK"]


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 700),
    height=st.integers(1, 700),
    mode=st.sampled_from(_MODES),
    fmt=st.sampled_from(["PNG", "JPEG", "WEBP", "GIF", "BMP"]),
    rgb=st.booleans(),
)
def test_any_size_and_mode_decodes_in_two_steps(width, height, mode, fmt, rgb):
    """Header first (the declared size, counted by the budgets), then a decode that takes any size and mode
    (past the sizes where JPEG decodes reduced and large images are resampled before their mode converts) to
    the input shape, and consumes the opened image."""
    base = mode.split("-")[0]
    im = Image.new(base, (width, height), 200 if base in ("L", "P", "1") else 0)
    kw = {"transparency": 0} if mode == "P-transparent" else {}
    try:
        data = _encode(im, fmt, **kw)
    except (OSError, ValueError):  # a mode this format cannot store: the nearest one it can
        data = _encode(im.convert("RGBA" if "A" in base and fmt != "JPEG" else "RGB"), fmt)
    opened = open_image(data, max_pixels=MAX_PIXELS)
    assert (opened.width, opened.height) == (width, height)
    pre = RGB if rgb else SERVED
    out = decode_opened(opened, pre)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (pre.channels, pre.image_size, pre.image_size)
    assert opened.image is None
