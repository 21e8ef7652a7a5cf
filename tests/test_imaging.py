"""Image decoding without HTTP: modes, EXIF orientation, animation, limits, and only ImageError escapes."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from model import Preprocessing
from service.imaging import (
    MAX_JPEG_SCANS,
    MAX_SIDE,
    MAX_WEBP_PIXELS,
    ImageError,
    _Glibc,
    _to_8bit,
    decode,
    decode_opened,
    open_image,
    opens_cheaply,
    release_memory,
)

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


# Header first, then a decode whose memory and time follow the declared pixel count (issue 12).


def test_open_image_reads_only_the_header():
    """A PNG that declares 4000x3000 but carries no pixel data opens (size known), and fails only when decoded."""
    png = _encode(Image.new("L", (4000, 3000)))
    header = png[: png.index(b"IDAT") + 4]
    opened = open_image(header, max_pixels=16_000_000)
    assert (opened.width, opened.height, opened.pixels, opened.dimensions) == (4000, 3000, 12_000_000, "4000x3000")
    with pytest.raises(ImageError) as e:
        decode_opened(opened, GRAY)
    assert e.value.status == 400 and e.value.code == "invalid_image"


def test_pixel_limit_message_names_the_numbers():
    with pytest.raises(ImageError) as e:
        open_image(_encode(Image.new("1", (4001, 4000))), max_pixels=16_000_000)
    assert e.value.status == 413 and e.value.code == "too_many_pixels"
    assert e.value.message == "the image is 4001x4000 = 16,004,000 pixels; the limit is 16,000,000 per image"


def test_no_side_over_the_cap():
    for size in [(1, MAX_SIDE + 1), (MAX_SIDE + 1, 1)]:
        with pytest.raises(ImageError) as e:
            open_image(_encode(Image.new("1", size)), max_pixels=10**9)
        assert e.value.status == 413 and f"{MAX_SIDE:,}" in e.value.message
    for size in [(1, MAX_SIDE), (MAX_SIDE, 1)]:  # the longest allowed: reduced without trouble
        assert decode(_encode(Image.new("L", size, 200)), GRAY, max_pixels=10**9).unique().tolist() == [200]


def test_decoding_consumes_the_opened_image():
    opened = open_image(_encode(Image.new("L", (300, 200))), max_pixels=10**6)
    decode_opened(opened, GRAY)
    assert opened.image is None


def _reference(im: Image.Image, pre) -> np.ndarray:
    """The former pipeline: float conversion of 16/32-bit, composite on white, convert, one resize."""
    if im.mode in ("I;16", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode == "I;16" else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA"):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    im = im.convert("L" if pre.channels == 1 else "RGB").resize((pre.image_size,) * 2, Image.BILINEAR)
    return np.asarray(im).reshape(pre.image_size, pre.image_size, pre.channels).transpose(2, 0, 1)


def _smooth(size: tuple[int, int], mode: str) -> Image.Image:
    """A smooth random field (what a photo is, at 28x28): box-reduction and direct resampling agree on it."""
    rng = np.random.default_rng(1)
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    coarse = rng.integers(0, 256, (size[1] // 50 + 2, size[0] // 50 + 2, bands), dtype=np.uint8)
    big = Image.fromarray(coarse.squeeze(-1) if bands == 1 else coarse).resize(size, Image.BICUBIC)
    return big.convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA"])
@pytest.mark.parametrize("pre", [GRAY, RGB], ids=["gray", "rgb"])
def test_large_images_decode_as_a_direct_resize_would(mode, pre):
    im = _smooth((1500, 1000), mode)
    got = decode(_encode(im), pre, max_pixels=10**7).numpy().astype(int)
    diff = np.abs(got - _reference(im, pre))
    assert diff.mean() < 1.0 and diff.max() <= 4, (diff.mean(), diff.max())


def test_sixteen_bit_is_scaled_exactly_as_before():
    arr = np.random.default_rng(2).integers(0, 65536, (28, 28), dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    np.testing.assert_array_equal(decode(_encode(im), GRAY, max_pixels=10**6).numpy(), _reference(im, GRAY))
    big = Image.fromarray(np.repeat(np.repeat(arr, 40, 0), 40, 1))  # 1120x1120
    diff = np.abs(decode(_encode(big), GRAY, max_pixels=10**7).numpy().astype(int) - _reference(big, GRAY))
    assert diff.max() <= 1


def test_thirty_two_bit_is_scaled_to_its_maximum():
    """No accepted format decodes to 32-bit greyscale today; the conversion is kept for any that would."""
    arr = np.arange(1100 * 1000, dtype=np.int32).reshape(1000, 1100) * 7  # more than one band
    im = Image.fromarray(arr)
    assert im.mode == "I"
    expected = np.clip(arr / arr.max() * 255.0, 0, 255).round().astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(_to_8bit(im.copy())), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_large_transparent_images_are_white(mode):
    im = Image.new("RGBA" if mode != "LA" else "LA", (2000, 1500), 0)
    kw = {}
    if mode == "P":
        im, kw = Image.new("P", (2000, 1500), 0), {"transparency": 0}
    assert int(decode(_encode(im, **kw), GRAY, max_pixels=10**7).min()) == 255
    assert int(decode(_encode(im, **kw), RGB, max_pixels=10**7).min()) == 255


def test_large_jpeg_is_decoded_at_reduced_scale_and_matches():
    im = _smooth((4000, 3000), "RGB")
    data = _encode(im, "JPEG", quality=95)
    opened = open_image(data, max_pixels=16_000_000)
    assert opened.pixels == 12_000_000  # the budget counts the declared size, not the reduced decode
    diff = np.abs(decode_opened(opened, GRAY).numpy().astype(int) - _reference(im, GRAY))
    assert diff.mean() < 1.5 and diff.max() <= 6, (diff.mean(), diff.max())


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_orientation_of_a_large_image_equals_rotating_first(orientation, fmt):
    im = _smooth((1200, 800), "L")
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(im, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    diff = np.abs(decode(data, GRAY, max_pixels=10**7).numpy().astype(int) - _reference(upright, GRAY))
    assert diff.mean() < 1.5 and diff.max() <= 6, (diff.mean(), diff.max())


def test_webp_headers_are_not_cheap():
    assert not opens_cheaply(_encode(Image.new("RGB", (8, 8)), "WEBP"))
    assert all(opens_cheaply(_encode(Image.new("RGB", (8, 8)), fmt)) for fmt in ("PNG", "JPEG", "GIF", "BMP"))


def test_release_memory_reads_the_environment(monkeypatch):
    release_memory()  # whatever this process's allocator, it never fails
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert _Glibc._tuned() is None
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "268435456")
    assert _Glibc._tuned() == (268435456, 128 * 1024)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0x4000000")
    assert _Glibc._tuned() == (268435456, 64 << 20)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576:glibc.malloc.arena_max=2")
    assert _Glibc._tuned() == (1 << 20, 128 * 1024)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "lots")
    assert _Glibc._tuned() is None


def test_a_progressive_jpeg_with_too_many_scans_is_refused_from_its_header():
    progressive = _encode(Image.new("RGB", (64, 64), (9, 99, 199)), "JPEG", progressive=True)
    assert decode(progressive, GRAY, max_pixels=10**6).shape == (1, 28, 28)  # 10 scans: a normal one
    last_scan = progressive.rindex(b"\xff\xda")
    end = progressive.rindex(b"\xff\xd9")
    copies = MAX_JPEG_SCANS + 1 - progressive.count(b"\xff\xda")
    bomb = progressive[:end] + progressive[last_scan:end] * copies + progressive[end:]
    with pytest.raises(ImageError) as e:
        open_image(bomb, max_pixels=10**6)
    assert e.value.status == 413 and e.value.code == "too_many_scans"
    assert f"{MAX_JPEG_SCANS + 1} scans" in e.value.message
    at_limit = progressive[:end] + progressive[last_scan:end] * (copies - 1) + progressive[end:]
    assert decode(at_limit, GRAY, max_pixels=10**6).shape == (1, 28, 28)


def test_webp_has_a_lower_pixel_limit_than_other_formats():
    """Pillow decodes WebP holding the interpreter lock: over MAX_WEBP_PIXELS it is refused from its header; a
    PNG of the same size is not."""
    big = Image.new("RGB", (2049, 2048), (9, 99, 199))
    with pytest.raises(ImageError) as e:
        open_image(_encode(big, "WEBP", lossless=True), max_pixels=16_000_000)
    assert e.value.status == 413 and "WebP" in e.value.message and f"{MAX_WEBP_PIXELS:,}" in e.value.message
    assert open_image(_encode(big, "PNG"), max_pixels=16_000_000).pixels == 2049 * 2048
    assert open_image(_encode(big.crop((0, 0, 2048, 2048)), "WEBP"), max_pixels=16_000_000).pixels == MAX_WEBP_PIXELS
