"""Inference backends: tensors in, tensors out, no HTTP. The worker owns one and calls it from one thread."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model import Checkpoint, complexity


@dataclass
class BatchOutput:
    probabilities: torch.Tensor  # (N, K) float32, CPU
    complexity: torch.Tensor  # (N,) float32
    seconds_by_depth: dict[int, float]  # model time of each depth group


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return device


class TorchBackend:
    """Runs the puppet with PyTorch on one device; images of one depth go through together.

    Args:
        ckpt: the loaded checkpoint (its model is moved to `device`).
        device: where the model runs.
        kernel_cache: generate every depth's kernels once; if false, the worker regenerates them for every
            batch (`generate_kernels`), which measures what the cache saves.
    """

    name = "torch"

    def __init__(self, ckpt: Checkpoint, device: torch.device, *, kernel_cache: bool = True):
        self.ckpt, self.device, self.kernel_cache = ckpt, device, kernel_cache
        self.model = ckpt.model.to(device).eval()
        self.max_depth = ckpt.config.max_depth
        self.provider = f"torch-{device.type}"

    def generate_kernels(self) -> float:
        """(Re)generate and cache every depth's kernels; returns the seconds it took."""
        t0 = time.perf_counter()
        self.model.cache_kernels()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def complexity(self, images: torch.Tensor) -> torch.Tensor:
        return complexity(images)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, dict[int, float]]:
        """Softmax probabilities for uint8 images (N, C, H, W) at per-image depths (N,)."""
        probs = torch.empty(len(images), self.ckpt.config.num_classes)
        seconds: dict[int, float] = {}
        x_all = images.to(self.device, non_blocking=True)
        for d in torch.unique(depths).tolist():
            idx = (depths == d).nonzero().squeeze(1)
            t0 = time.perf_counter()
            x = self.ckpt.preprocessing.normalise(x_all[idx.to(self.device)])
            p = torch.softmax(self.model(x, int(d)).float(), dim=-1).cpu()
            seconds[int(d)] = time.perf_counter() - t0
            probs[idx] = p
        return probs, seconds

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> float:
        """Run every depth once per batch size so the first request pays no one-off cost."""
        t0 = time.perf_counter()
        pre = self.ckpt.preprocessing
        for n in batch_sizes:
            images = torch.zeros(n, pre.channels, pre.image_size, pre.image_size, dtype=torch.uint8)
            for d in range(1, self.max_depth + 1):
                self.predict(images, torch.full((n,), d))
        return time.perf_counter() - t0

    def device_memory_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self.device))
