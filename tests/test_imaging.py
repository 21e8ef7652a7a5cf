"""Image decoding without HTTP: modes, EXIF orientation, animation, limits, and only ImageError escapes."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from model import Preprocessing
from service.imaging import ImageError, decode

GRAY = Preprocessing(28, 1, (0.5,), (0.5,))
RGB = Preprocessing(8, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _encode(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_round_trip_is_exact():
    arr = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    out = decode(_encode(Image.fromarray(arr)), GRAY, max_pixels=10**6)
    assert out.dtype == torch.uint8 and out.shape == (1, 28, 28)
    np.testing.assert_array_equal(out[0].numpy(), arr)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK", "LA", "1"])
def test_every_mode_converts(mode):
    im = (
        Image.new("RGB", (28, 28), (200, 200, 200)).convert(mode)
        if mode != "I;16"
        else Image.new(mode, (28, 28), 40000)
    )
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    if mode == "LA":
        im = Image.new("LA", (28, 28), (200, 255))
    out = decode(_encode(im, fmt), GRAY, max_pixels=10**6)
    assert out.shape == (1, 28, 28)
    assert decode(_encode(im, fmt), RGB, max_pixels=10**6).shape == (3, 8, 8)


def test_sixteen_bit_scales_to_eight():
    im = Image.new("I;16", (28, 28), 65535)
    assert int(decode(_encode(im), GRAY, max_pixels=10**6).max()) == 255


def test_transparent_pixels_become_white():
    im = Image.new("RGBA", (28, 28), (0, 0, 0, 0))
    assert int(decode(_encode(im), GRAY, max_pixels=10**6).min()) == 255


def test_exif_orientation_is_applied():
    arr = np.zeros((28, 28), dtype=np.uint8)
    arr[:, :14] = 255  # left half white
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: the viewer shows the right half white
    out = decode(_encode(im, "JPEG", exif=exif, quality=100), GRAY, max_pixels=10**6)[0].float()
    assert out[:, 20:].mean() > 200 and out[:, :8].mean() < 50


def test_gif_first_frame():
    frames = [Image.new("L", (28, 28), v) for v in (10, 250)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert int(decode(buf.getvalue(), GRAY, max_pixels=10**6).float().mean()) < 30


def test_pixel_limit_is_checked_before_decoding():
    big = _encode(Image.new("1", (5000, 5000)))
    with pytest.raises(ImageError) as e:
        decode(big, GRAY, max_pixels=1_000_000)
    assert e.value.status == 413 and e.value.code == "too_many_pixels"


def test_arbitrary_bytes_raise_only_image_error():
    rng = random.Random(0)
    png = _encode(Image.new("L", (28, 28), 7))
    samples = [b"", b"\x89PNG", png[:40], png[:-5], bytes(rng.randrange(256) for _ in range(300))]
    samples += [bytearray(png) for _ in range(40)]
    for s in samples[5:]:
        for _ in range(4):
            s[rng.randrange(len(s))] = rng.randrange(256)
    for s in samples:
        try:
            decode(bytes(s), GRAY, max_pixels=10**6)
        except ImageError as e:
            assert 400 <= e.status < 500 and e.message
