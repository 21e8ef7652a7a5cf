"""Input complexity H(x) = 1/2 E(x) + 1/2 E(Y(x)).

E is the Shannon entropy (bits) of a 256-bin intensity histogram, computed per channel and averaged;
Y is the Sobel gradient magnitude of the image, quantised to 256 bins over its full possible range.
The paper leaves Y undefined; docs/design.md records this choice.

H is defined on 8-bit levels and computed exactly: the Sobel filter in integers on the levels, the magnitude's
bin from its integer square (a table: the nearest level, a tie to the even one), the entropy from a table of
n·log2(n) over the pixel counts. So an image has one H on every machine, whatever the device or the BLAS (with
floating-point convolutions, the gradient of a smooth region falls exactly between two bins, and the bin it got
depended on the order of summation). It runs in numpy on the CPU: for a 28×28 image it is one small pass, where
a chain of torch operators cost more (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

BINS = 256
# Largest Sobel magnitude of an image in [0, 1]: |gx| and |gy| are each at most 4.
_MAX_SOBEL = 4.0 * math.sqrt(2.0)
# On levels 0..255, |gx| and |gy| are each at most 4 * 255: the squared magnitude is at most this
_MAX_SQUARED = 2 * (4 * 255) ** 2


@cache
def _n_log2_n(pixels: int) -> np.ndarray:
    """n * log2(n) for n = 0..pixels (0 for n = 0)."""
    n = np.arange(pixels + 1, dtype=np.float64)
    out = np.zeros(pixels + 1)
    out[1:] = n[1:] * np.log2(n[1:])
    return out


@cache
def _magnitude_bins() -> np.ndarray:
    """The gradient bin of each squared magnitude m of a Sobel filter on levels: the bin is the magnitude over
    the full range, round(sqrt(m) / 255 / _MAX_SOBEL * 255) = round(sqrt(m / 32)), taken exactly in integers:
    bin L starts where 32 (L - 1/2)^2 = 8 (2L - 1)^2 <= m, so a bin is the number of thresholds at or below m. A
    tie (m on a threshold) goes to the even neighbour, as torch.round and numpy.rint do: an odd L's threshold
    counts only strictly above it (+1, m being an integer). Built once per process (docs/benchmarks.md), looked
    up per pixel."""
    bins = np.arange(1, BINS)
    thresholds = 8 * (2 * bins - 1) ** 2 + bins % 2
    return np.searchsorted(thresholds, np.arange(_MAX_SQUARED + 1), side="right").astype(np.uint8)


def _levels(images: torch.Tensor) -> np.ndarray:
    """uint8 levels (B, C, H, W) as a numpy array on the CPU: uint8 as they are, intensities in [0, 1] rounded
    to the nearest of 256 levels."""
    if images.ndim != 4:
        raise ValueError(f"complexity expects a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = to_levels(images, 1.0)
    return images.detach().cpu().numpy()


def _entropy_rows(levels: np.ndarray) -> np.ndarray:
    """Entropy in bits of each row's 256-bin histogram: (R, P) levels -> (R,) float64. One bincount for all rows
    (each owns 256 consecutive bins); with p = n / P, -sum p log2 p = log2 P - sum n log2 n / P."""
    rows, pixels = levels.shape
    offsets = np.arange(rows, dtype=np.int64)[:, None] * BINS
    counts = np.bincount((levels + offsets).ravel(), minlength=rows * BINS).reshape(rows, BINS)
    return math.log2(pixels) - _n_log2_n(pixels)[counts].sum(axis=1) / pixels


def _channel_mean_entropy(levels: np.ndarray) -> np.ndarray:
    b, c = levels.shape[:2]
    return _entropy_rows(levels.reshape(b * c, -1).astype(np.int64)).reshape(b, c).mean(axis=1)


def histogram_entropy(levels: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each channel's 256-bin histogram, averaged over channels.

    Args:
        levels: integer levels in [0, 255], shape (B, C, H, W).

    Returns:
        Entropy per image, shape (B,), float32.
    """
    return torch.from_numpy(_channel_mean_entropy(_levels(levels)).astype(np.float32))


def sobel_levels(levels: np.ndarray) -> np.ndarray:
    """The Sobel gradient magnitude of each channel, replicate-padded (a constant image gives zero), quantised to
    256 bins over its full range: uint8 (B, C, H, W) in, uint8 (B, C, H, W) out, exact."""
    p = np.pad(levels.astype(np.int32), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    left, right = p[..., :-2], p[..., 2:]
    gx = (right[..., :-2, :] - left[..., :-2, :]) + 2 * (right[..., 1:-1, :] - left[..., 1:-1, :])
    gx += right[..., 2:, :] - left[..., 2:, :]
    top, bottom = p[..., :-2, :], p[..., 2:, :]
    gy = (
        (bottom[..., :-2] - top[..., :-2]) + 2 * (bottom[..., 1:-1] - top[..., 1:-1]) + (bottom[..., 2:] - top[..., 2:])
    )
    return _magnitude_bins()[gx * gx + gy * gy]


def to_levels(values: torch.Tensor, max_value: float) -> torch.Tensor:
    """Quantise values in [0, max_value] to integer levels 0..255."""
    return (values / max_value * (BINS - 1)).round().clamp(0, BINS - 1).to(torch.uint8)


def complexity(images: torch.Tensor) -> torch.Tensor:
    """H(x) in bits for a batch of images.

    Args:
        images: uint8 levels 0..255, or intensities in [0, 1] (before mean/std normalisation, rounded to the
            nearest level), shape (B, C, H, W), on any device.

    Returns:
        Complexity per image, shape (B,), float32 on the CPU, between 0 (constant image) and 8.
    """
    levels = _levels(images)
    h = 0.5 * _channel_mean_entropy(levels) + 0.5 * _channel_mean_entropy(sobel_levels(levels))
    return torch.from_numpy(h.astype(np.float32))
