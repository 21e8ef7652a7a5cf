"""What every peer does per image, written once so the peers differ only in how they serve it.

The work matches the service's (service/routes.py + service/batcher.py + service/backends.TorchBackend):
PNG decode to the checkpoint's preprocessing (service.imaging.decode, the same Pillow code), complexity H(x)
on the uint8 batch, depth from the checkpoint's table (policy.auto), the puppet with cached kernels and
per-sample depths in one call, softmax, top-5 labels with probabilities, the depth and the complexity.
Only the `model` package and `service.imaging.decode` are imported: no serving internals.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import torch

from model import Checkpoint, complexity, load_checkpoint
from service.imaging import decode

SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "puppet-cnn-fmnist.safetensors"
MAX_PIXELS = 40_000_000  # the service's default PUPPET_MAX_PIXELS
TOP_K = 5  # the service's default PUPPET_DEFAULT_TOP_K
CONSTANT = {
    "predictions": [{"label": "constant", "class_id": 0, "probability": 1.0}],
    "depth": 1,
    "complexity": 0.0,
}


def arguments(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT)
    return p


def load(path: Path) -> Checkpoint:
    """The checkpoint on CPU, eval mode, every depth's kernels generated once; one torch thread."""
    torch.set_num_threads(1)
    ckpt = load_checkpoint(path)
    ckpt.model.eval()
    ckpt.model.cache_kernels()
    return ckpt


def decode_b64(text: str, ckpt: Checkpoint) -> torch.Tensor:
    """A base64 PNG (the JSON body's "image") -> uint8 (C, H, W) at the checkpoint's input size."""
    return decode(base64.b64decode(text, validate=True), ckpt.preprocessing, max_pixels=MAX_PIXELS)


@torch.inference_mode()
def classify(ckpt: Checkpoint, images: torch.Tensor) -> list[dict]:
    """uint8 batch (N, C, H, W) -> one answer per image: top-5 predictions, depth, complexity."""
    h = complexity(images)
    depths = ckpt.policy.auto(h)
    x = ckpt.preprocessing.normalise(images)
    probs = torch.softmax(ckpt.model(x, depths).float(), dim=-1)
    values, indices = probs.topk(min(TOP_K, probs.shape[1]))
    return [
        {
            "predictions": [
                {"label": ckpt.classes[i], "class_id": i, "probability": round(v, 7)}
                for v, i in zip(vs, ids, strict=True)
            ],
            "depth": d,
            "complexity": round(c, 5),
        }
        for vs, ids, d, c in zip(values.tolist(), indices.tolist(), depths.tolist(), h.tolist(), strict=True)
    ]


def warmup(ckpt: Checkpoint) -> None:
    """Run every depth once at batch 1 and 8 (as TorchBackend.warmup does) so no request pays a one-off cost."""
    pre = ckpt.preprocessing
    with torch.inference_mode():
        for n in (1, 8):
            x = pre.normalise(torch.zeros(n, pre.channels, pre.image_size, pre.image_size, dtype=torch.uint8))
            for d in range(1, ckpt.config.max_depth + 1):
                ckpt.model(x, torch.full((n,), d))
