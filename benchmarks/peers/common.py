"""What every peer does per image, written once so the peers differ only in how they serve it.

The work is the service's, through the service's own code: PNG decode to the checkpoint's preprocessing
(`service.imaging.decode`, the same Pillow code), complexity H(x) on the uint8 batch, depth from the checkpoint's
table (`policy.auto`), then the model through the same backend class the service runs (`service.backends`:
onnxruntime sessions, one per depth, kernels folded in; or torch with cached kernels and per-sample depths),
softmax, top-5 labels with probabilities, the depth and the complexity. No serving internals are imported.

The ONNX graphs are exported once by the harness (`puppet-cnn export-onnx`) and passed as `--onnx-dir`; a peer
only verifies them against the checkpoint, so its environment needs no exporter.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import torch

from model import SHIPPED_CHECKPOINT, Checkpoint, load_checkpoint
from model.onnx_export import verified_export
from service.backends import Backend, OnnxBackend, TorchBackend
from service.imaging import decode

MAX_PIXELS = 16_000_000  # the service's default PUPPET_MAX_PIXELS
TOP_K = 5  # the service's default PUPPET_DEFAULT_TOP_K
MAX_BATCH_SIZE = 32  # the service's default PUPPET_MAX_BATCH_SIZE
CONSTANT = {
    "predictions": [{"label": "constant", "class_id": 0, "probability": 1.0}],
    "depth": 1,
    "complexity": 0.0,
}


def arguments(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT)
    p.add_argument("--backend", choices=["onnx", "torch"], default="onnx", help="the service's backend classes")
    p.add_argument("--onnx-dir", type=Path, default=None, help="`puppet-cnn export-onnx --out` of the checkpoint")
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE)
    return p


class Engine:
    """The checkpoint on the CPU behind one of the service's backends, warmed; one intra-op thread (as each of
    the service's workers runs)."""

    def __init__(self, checkpoint: Path | str, backend: str = "onnx", onnx_dir: Path | str | None = None):
        torch.set_num_threads(1)
        self.ckpt: Checkpoint = load_checkpoint(checkpoint)
        cpu = torch.device("cpu")
        if backend == "onnx":
            if onnx_dir is None:
                raise ValueError("--backend onnx needs --onnx-dir (puppet-cnn export-onnx --out DIR)")
            self.backend: Backend = OnnxBackend(self.ckpt, cpu, verified_export(self.ckpt, onnx_dir), threads=1)
        else:
            self.backend = TorchBackend(self.ckpt, cpu)
            self.backend.generate_kernels()
        self.backend.warmup(batch_sizes=(1, 8, MAX_BATCH_SIZE))
        pre = self.ckpt.preprocessing  # and complexity, whose lookup tables are built on first use
        self.backend.complexity(torch.zeros(1, pre.channels, pre.image_size, pre.image_size, dtype=torch.uint8))

    def decode_b64(self, text: str | bytes) -> torch.Tensor:
        """A base64 PNG (the JSON body's "image") -> uint8 (C, H, W) at the checkpoint's input size."""
        return decode(base64.b64decode(text, validate=True), self.ckpt.preprocessing, max_pixels=MAX_PIXELS)

    def classify(self, images: torch.Tensor) -> list[dict]:
        """uint8 batch (N, C, H, W) -> one answer per image: top-5 predictions, depth, complexity."""
        h = self.backend.complexity(images)
        depths = self.ckpt.policy.auto(h)
        probs, _ = self.backend.predict(images, depths)
        values, indices = probs.topk(min(TOP_K, probs.shape[1]))
        classes = self.ckpt.classes
        return [
            {
                "predictions": [
                    {"label": classes[i], "class_id": i, "probability": round(v, 7)}
                    for v, i in zip(vs, ids, strict=True)
                ],
                "depth": d,
                "complexity": round(c, 5),
            }
            for vs, ids, d, c in zip(values.tolist(), indices.tolist(), depths.tolist(), h.tolist(), strict=True)
        ]

    def classify_b64(self, images: list[str]) -> list[dict]:
        """A batch of base64 PNGs, decoded one by one and classified together."""
        return self.classify(torch.stack([self.decode_b64(text) for text in images]))
