"""Input complexity H(x) = 1/2 E(x) + 1/2 E(Y(x)).

E is the Shannon entropy (bits) of a 256-bin intensity histogram, computed per channel and averaged;
Y is the Sobel gradient magnitude of the image, quantised to 256 bins over its full possible range.
The paper leaves Y undefined; docs/design.md records this choice. Everything here is batched and runs on
whatever device the images are on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BINS = 256
# Largest Sobel magnitude of an image in [0, 1]: |gx| and |gy| are each at most 4.
_MAX_SOBEL = 4.0 * math.sqrt(2.0)


def histogram_entropy(levels: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each channel's 256-bin histogram, averaged over channels.

    Args:
        levels: integer levels in [0, 255], shape (B, C, H, W).

    Returns:
        Entropy per image, shape (B,).
    """
    b, c = levels.shape[:2]
    # One bincount for the whole batch: every (image, channel) pair owns 256 consecutive bins.
    offsets = torch.arange(b * c, device=levels.device).view(b, c, 1, 1) * BINS
    counts = torch.bincount((levels.long() + offsets).flatten(), minlength=b * c * BINS)
    counts = counts.view(b, c, BINS).to(torch.float64)
    p = counts / counts.sum(dim=-1, keepdim=True)
    plogp = torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))
    return (-plogp.sum(dim=-1)).mean(dim=1).to(torch.float32)


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude per channel, replicate-padded so a constant image gives zero.

    Args:
        images: intensities in [0, 1], shape (B, C, H, W).
    """
    c = images.shape[1]
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    kernels = torch.stack([gx, gx.t()]).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3)
    padded = F.pad(images.float(), (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, kernels, groups=c)  # (B, 2C, H, W): gx, gy per channel
    grads = grads.view(images.shape[0], c, 2, *images.shape[2:])
    return grads.pow(2).sum(dim=2).sqrt()


def to_levels(values: torch.Tensor, max_value: float) -> torch.Tensor:
    """Quantise values in [0, max_value] to integer levels 0..255."""
    return (values / max_value * (BINS - 1)).round().clamp(0, BINS - 1).to(torch.uint8)


def complexity(images: torch.Tensor) -> torch.Tensor:
    """H(x) in bits for a batch of images.

    Args:
        images: raw intensities in [0, 1] (before mean/std normalisation), shape (B, C, H, W),
            or uint8 levels 0..255.

    Returns:
        Complexity per image, shape (B,), between 0 (constant image) and 8.
    """
    if images.ndim != 4:
        raise ValueError(f"complexity expects a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        levels = images
        images = images.float() / 255.0
    else:
        levels = to_levels(images, 1.0)
    e_image = histogram_entropy(levels)
    e_grad = histogram_entropy(to_levels(sobel_magnitude(images), _MAX_SOBEL))
    return 0.5 * e_image + 0.5 * e_grad
