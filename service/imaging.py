"""Decode uploaded images into the uint8 tensors the checkpoint expects. Pure functions, no HTTP.

Every failure raises `ImageError` with an HTTP status and a stable code; nothing else escapes `decode`.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model import Preprocessing

SUPPORTED_TYPES = {"image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif"}
_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "MPO"}


class ImageError(ValueError):
    """An upload that cannot be classified; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode (L, RGB, RGBA, P, I;16, I, F, CMYK, LA, ...) to L or RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # composite on white: what a viewer shows, and a transparent background is not black ink
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("L" if channels == 1 else "RGB")


def decode(data: bytes, pre: Preprocessing, *, max_pixels: int) -> torch.Tensor:
    """Bytes of one image -> uint8 tensor (C, H, W) at the checkpoint's input size.

    Applies EXIF orientation, takes the first frame of animations, converts the mode, resizes.
    Refuses images over `max_pixels` from the header, before the bitmap is decoded.
    """
    if not data:
        raise ImageError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
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
                    f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
                )
            if width == 0 or height == 0:
                raise ImageError(400, "invalid_image", "the image has no pixels")
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            im = _to_mode(im, pre.channels)
            im = im.resize((pre.image_size, pre.image_size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
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
    arr = arr.reshape(pre.image_size, pre.image_size, pre.channels)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
