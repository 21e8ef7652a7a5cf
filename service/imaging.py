"""Decode uploaded images into the uint8 tensors the checkpoint expects. Pure functions, no HTTP.

Two steps, so a caller can check every image of a request before decoding any: `open_image` reads only the
header (format, declared size; refused over the pixel limit), `decode_opened` decodes the bitmap and brings
it to the checkpoint's input. `decode` does both. Every failure raises `ImageError` with an HTTP status and a
stable code; nothing else escapes.

Time and memory follow the declared pixel count, and the full-size bitmap is made small as early as possible:
a JPEG is decoded at 1/2..1/8 scale by libjpeg (`draft`); 16-bit and 32-bit greyscale go to 8 bits in bands
(never a float copy of the whole image); the image is resampled to the input size before its transparency is
composited and its mode converted, and EXIF orientation is applied to the result; each full-size bitmap is
released as soon as the next exists. No side may be longer than MAX_SIDE."""

from __future__ import annotations

import ctypes
import io
import os
import struct
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from model import Preprocessing
from service.exif import TRANSPOSE, orientation

# Pillow warns when a header declares more than Image.MAX_IMAGE_PIXELS (89 M), before `open_image` checks its
# own limit: an error instead, refused as 413 like anything over the limit. Set once, here: warning filters
# are process-wide, and toggling them per call (catch_warnings) races between decoding threads.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

SUPPORTED_TYPES = {"image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif"}
_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "MPO"}
# Pillow builds a table of row pointers for every bitmap, holding the interpreter lock, so a PNG one pixel wide
# and millions of rows tall stalled the event loop (and every thread) before decoding began (docs/design.md). No
# real image is taller or wider than JPEG's and GIF's maximum, and at this cap the table costs little.
MAX_SIDE = 65_535
# libjpeg makes a pass over the whole image for every scan of a progressive JPEG, and puts no bound on their
# number: a JPEG at the pixel limit repeating one scan thousands of times took minutes to decode, and a tiny one
# stalled the event loop (docs/design.md). Encoders write 1 to about 12; beyond this, refused from the header.
MAX_JPEG_SCANS = 32
# Pillow decodes WebP (libwebp's animation decoder) holding the interpreter lock: a lossless WebP at 16 M pixels
# stalled the event loop, and so health checks, too long to keep a slower CPU within their target (docs/design.md).
# At 2048x2048 the stall is about a quarter of that.
MAX_WEBP_PIXELS = 2048 * 2048
JPEG_SCALE_GAP = 3  # libjpeg's reduced decode stops at 3x the input size; bilinear resampling does the rest
RELEASE_MEMORY_PIXELS = 1 << 20  # decoding an image this large returns its memory to the operating system
_BAND_PIXELS = 1 << 20  # high-depth to 8-bit conversion works on bands of about this many pixels
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_RESAMPLED = ("L", "LA", "RGB", "RGBA", "CMYK")  # 8-bit modes Image.resize resamples (not 1 or P)
_LUT16 = np.clip(np.arange(65536, dtype=np.float64) / 65535.0 * 255.0, 0, 255).round().astype(np.uint8)


class ImageError(ValueError):
    """An upload that cannot be classified; `status` is the HTTP status to answer with, `index` (when set by
    the caller) which of the request's images it is."""

    index: int | None = None

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(eq=False)
class OpenedImage:
    """An image whose header has been read and checked; its bitmap is not decoded yet. `decode_opened`
    consumes it (`image` is None afterwards)."""

    image: Image.Image | None
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def dimensions(self) -> str:
        return f"{self.width}x{self.height}"


def opens_cheaply(data: bytes) -> bool:
    """Whether reading this upload's header costs little whatever its declared size: false for WebP, whose
    reader (libwebp's animation decoder) allocates and clears two full-size RGBA canvases as the header is
    read, holding the interpreter lock (a stall of the event loop at 16 M pixels where glibc serves them from its
    heap, as in the serving environment, service/process_env.py: docs/design.md)."""
    return not (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def open_image(data: bytes, *, max_pixels: int) -> OpenedImage:
    """Read the header of one image: its format and declared size. Refuses an unsupported format (415), an
    image over `max_pixels` or with a side over MAX_SIDE (413), a JPEG of more than MAX_JPEG_SCANS scans (413),
    or one with no pixels (400); never decodes the bitmap."""
    if not data:
        raise ImageError(400, "empty_image", "the image is empty (0 bytes)")
    with _image_errors():
        im = Image.open(io.BytesIO(data))
        if im.format not in _FORMATS:
            raise ImageError(
                415,
                "unsupported_image_type",
                f"{im.format} images are not accepted; send PNG, JPEG, WebP, BMP or GIF",
            )
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(
                413,
                "too_many_pixels",
                f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} per image",
            )
        if im.format == "WEBP" and width * height > min(max_pixels, MAX_WEBP_PIXELS):
            raise ImageError(
                413,
                "too_many_pixels",
                f"the WebP image is {width}x{height} = {width * height:,} pixels; WebP is decoded holding the "
                f"interpreter lock, so its limit is {MAX_WEBP_PIXELS:,} (send PNG or JPEG for larger images)",
            )
        if max(width, height) > MAX_SIDE:
            raise ImageError(
                413,
                "too_many_pixels",
                f"the image is {width}x{height}; a side longer than {MAX_SIDE:,} pixels (the most JPEG and GIF "
                "allow) is refused",
            )
        if width == 0 or height == 0:
            raise ImageError(400, "invalid_image", "the image has no pixels")
        # every start-of-scan marker; entropy-coded data cannot hold one (a 0xFF there is followed by 0x00)
        if im.format in ("JPEG", "MPO") and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            raise ImageError(
                413,
                "too_many_scans",
                f"the JPEG has {scans:,} scans; at most {MAX_JPEG_SCANS} are decoded (encoders write 1 to about 12)",
            )
        return OpenedImage(im, width, height)


def decode_opened(opened: OpenedImage, pre: Preprocessing) -> torch.Tensor:
    """Decode an opened image to a uint8 tensor (C, H, W) at the checkpoint's input size.

    Takes the first frame of animations, applies EXIF orientation, converts any mode to the checkpoint's
    channels (transparency composited on white), resizes. The decoded bitmap is released before returning.
    """
    size, channels = pre.image_size, pre.channels
    im = opened.image
    try:
        with _image_errors():
            im.seek(0)
            if im.format in ("JPEG", "MPO"):
                # libjpeg scales by 1/2, 1/4 or 1/8 while decoding (never below JPEG_SCALE_GAP x the input
                # size), and gives its luma channel directly when one channel is wanted
                im.draft("L" if channels == 1 else None, (size * JPEG_SCALE_GAP, size * JPEG_SCALE_GAP))
            im.load()
            turn = TRANSPOSE.get(orientation(im))  # bounded: a crafted EXIF block costs nothing (service/exif.py)
            small = _to_mode(_shrink(im, size, channels), channels)
            if turn is not None:  # on the small result: same pixels as rotating first
                small = small.transpose(turn)
            arr = np.asarray(small, dtype=np.uint8)
    finally:
        # the bitmap, and whatever the codec holds (WebP keeps its decoder and two full-size canvases on the
        # image object), go now; a large image's memory goes back to the operating system with them
        with _GLIBC.releasing() if opened.pixels >= RELEASE_MEMORY_PIXELS else nullcontext():
            opened.image.close()
            opened.image = im = small = None
    arr = arr.reshape(size, size, channels)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def discard(images: list[OpenedImage | None]) -> None:
    """Release opened images that will not be decoded (their request was refused): a WebP header alone holds
    two full-size canvases. Their memory goes back to the operating system when any is large."""
    left = [o for o in images if o is not None and o.image is not None]
    with _GLIBC.releasing() if any(o.pixels >= RELEASE_MEMORY_PIXELS for o in left) else nullcontext():
        for o in left:
            o.image.close()
            o.image = None
        del left


def decode(data: bytes, pre: Preprocessing, *, max_pixels: int) -> torch.Tensor:
    """Bytes of one image -> uint8 tensor (C, H, W) at the checkpoint's input size.

    Refuses images over `max_pixels` from the header, before the bitmap is decoded.
    """
    return decode_opened(open_image(data, max_pixels=max_pixels), pre)


@contextmanager
def _image_errors():
    """Pillow's and the codecs' failures as ImageError (4xx); ImageError itself passes through.

    Pillow's own decompression-bomb check (above 89 M pixels, far beyond `max_pixels`) is refused as 413."""
    try:
        yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            400, "invalid_image", "the body is not an image Pillow can identify (PNG, JPEG, WebP, BMP, GIF)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(413, "too_many_pixels", f"the image is too large to decode: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise ImageError(400, "invalid_image", f"the image could not be decoded (truncated or corrupt?): {e}") from None
    except MemoryError:
        raise ImageError(413, "too_many_pixels", "the image needs more memory to decode than is available") from None


def _shrink(im: Image.Image, size: int, channels: int) -> Image.Image:
    """The image at `size` x `size`, in a mode `_to_mode` turns into the checkpoint's: high bit depths go to
    8 bits, palettes and 1-bit images to the mode they would become, and the result is resampled as before
    (bilinear over the whole image) but before its transparency is composited and its mode converted, so
    those run on 28x28 instead of on the full image (each full-size bitmap is released once the next exists).
    RGBA and LA are resampled premultiplied (Pillow), so compositing on white afterwards gives the same result.
    """
    if im.mode in _HIGH_DEPTH:
        im = _to_8bit(im)
    if im.mode not in _RESAMPLED:  # 1, P, PA, YCbCr, ...: to the mode _to_mode would start from
        transparent = "A" in im.mode or (im.mode == "P" and "transparency" in im.info)
        im = _replace(im, im.convert("RGBA" if transparent else "L" if channels == 1 else "RGB"))
    return _replace(im, im.resize((size, size), Image.BILINEAR))


def _replace(old: Image.Image, new: Image.Image) -> Image.Image:
    """`new`, having released `old`'s bitmap at once (a large one must not outlive its use)."""
    old.close()
    return new


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit (scaled from 0..65535) or 32-bit (scaled from 0..max) greyscale to L, band by band: a whole
    float64 copy of a 16-megapixel image would be 128 MB, and this needs one 8-bit output and a band."""
    arr = np.asarray(im)  # a copy of the bitmap in its own dtype (uint16, int32 or float32)
    im.close()
    out = np.empty(arr.shape, dtype=np.uint8)
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    top = 65535.0 if arr.dtype.itemsize == 2 else max(float(arr.max()), 1.0)
    for a in range(0, flat_in.size, _BAND_PIXELS):
        band = flat_in[a : a + _BAND_PIXELS]
        if arr.dtype.itemsize == 2:
            flat_out[a : a + _BAND_PIXELS] = _LUT16[band]
        else:
            flat_out[a : a + _BAND_PIXELS] = np.clip(band.astype(np.float64) / top * 255.0, 0, 255).round()
    del arr
    return Image.fromarray(out)  # uint8, two dimensions: mode L


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any 8-bit PIL mode (L, RGB, RGBA, P, CMYK, LA, 1, ...) to L or RGB."""
    if im.mode in _HIGH_DEPTH:
        im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # composite on white: what a viewer shows, and a transparent background is not black ink
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


class _Glibc:
    """glibc's allocator controls, through ctypes; `available` is False where there is no glibc (musl, macOS)."""

    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    FIXED_MMAP_THRESHOLD = 4 << 20
    DEFAULT_TRIM_THRESHOLD = DEFAULT_TOP_PAD = 128 * 1024  # glibc's defaults (mallopt(3))

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL(None)
            self.malloc_trim, self.mallopt, self.malloc, self.free = (
                libc.malloc_trim,
                libc.mallopt,
                libc.malloc,
                libc.free,
            )
        except (OSError, AttributeError, TypeError):
            self.available = False
            return
        self.available = True
        self.malloc_trim.argtypes, self.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        self.mallopt.argtypes, self.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        self.malloc.argtypes, self.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
        self.free.argtypes, self.free.restype = [ctypes.c_void_p], None
        self.tuned = self._tuned()
        self.lock = threading.Lock()
        if not self._set_in_environment("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"):
            # glibc's default mmap threshold grows with every large free, up to 32 MB: buffers of a few MB (a WebP
            # canvas, a decoded body) then come from thread heaps and stay there after they are freed (RSS stayed
            # above warm after the worst uploads: docs/reliability.md). Fixed, they are mapped and unmapped.
            # The serving environment (service/process_env.py) sets its own.
            self.mallopt(self.M_MMAP_THRESHOLD, self.FIXED_MMAP_THRESHOLD)

    @staticmethod
    def _set_in_environment(variable: str, tunable: str) -> bool:
        return variable in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")

    @classmethod
    def _tuned(cls) -> tuple[int, int] | None:
        """The trim threshold and top pad this process was started with, when its environment set either
        (MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ or GLIBC_TUNABLES, as the serving environment does)."""
        tunables = dict(item.split("=", 1) for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
        trim = os.environ.get("MALLOC_TRIM_THRESHOLD_") or tunables.get("glibc.malloc.trim_threshold")
        pad = os.environ.get("MALLOC_TOP_PAD_") or tunables.get("glibc.malloc.top_pad")
        if trim is None and pad is None:
            return None
        try:
            values = int(trim, 0) if trim else cls.DEFAULT_TRIM_THRESHOLD, int(pad, 0) if pad else cls.DEFAULT_TOP_PAD
        except ValueError:
            return None
        return values if all(0 <= v < 2**31 for v in values) else None

    @contextmanager
    def releasing(self):
        """Memory freed inside this block goes back to the operating system.

        glibc gives each thread its own heap. With a trim threshold set (as the serving environment does) it
        never shrinks a thread's heap, and malloc_trim does not either, so every thread that ever held a large
        bitmap (the decoding threads, and the one that read a WebP header, whose reader allocates full-size
        canvases) would keep up to 64 MB. Here the threshold and pad are 0 while the block runs, so each large
        free shrinks the heap it belongs to, whichever thread allocated it; a last free does the same for this
        thread's heap; then they are restored, and malloc_trim(0) returns the main heap's free memory.
        Elsewhere (glibc's defaults) freed memory is trimmed anyway, and only malloc_trim(0) runs."""
        if not self.available:
            yield
            return
        with self.lock:
            if self.tuned is None:
                yield
            else:
                self.mallopt(self.M_TRIM_THRESHOLD, 0)
                self.mallopt(self.M_TOP_PAD, 0)
                try:
                    yield
                    self.free(self.malloc(128 * 1024))
                finally:
                    self.mallopt(self.M_TRIM_THRESHOLD, self.tuned[0])
                    self.mallopt(self.M_TOP_PAD, self.tuned[1])
            self.malloc_trim(0)


_GLIBC = _Glibc()


def release_memory() -> None:
    """Give the heap memory freed so far back to the operating system (see `_Glibc.releasing`); a no-op
    without glibc. Costs about a millisecond."""
    with _GLIBC.releasing():
        pass
