"""ONNX export: one graph per depth, with that depth's generated kernels folded in as constants.

torchdiffeq does not export, and need not: the puppeteer runs once here, and each graph holds the
kernels it produced. A manifest ties the set to the checkpoint's sha256, so a stale or tampered export is
refused with a clear error instead of being served.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from model.checkpoint import Checkpoint

OPSET = 17
MANIFEST = "manifest.json"
FORMAT = "puppet-cnn-onnx/1"


class OnnxExportError(ValueError):
    """An ONNX export is missing, stale (another checkpoint) or corrupt; the message says which file."""


class FixedDepth(nn.Module):
    """The puppet at one depth, reading kernels from the model's cache (traced as constants)."""

    def __init__(self, model: nn.Module, depth: int):
        super().__init__()
        self.model, self.depth = model, depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.depth)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_onnx(ckpt: Checkpoint, out_dir: str | Path, *, opset: int = OPSET) -> Path:
    """Write depth-<d>.onnx for d = 1..D_max and manifest.json into out_dir; returns the manifest path."""
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ckpt.model.cpu().eval()
    model.cache_kernels()
    pre = ckpt.preprocessing
    example = torch.zeros(2, pre.channels, pre.image_size, pre.image_size)
    files = {}
    for d in range(1, ckpt.config.max_depth + 1):
        path = out_dir / f"depth-{d}.onnx"
        wrapper = FixedDepth(model, d).eval()  # eval: the exporter restores this mode afterwards
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,  # the TorchScript exporter: no onnxscript dependency
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )
        graph = onnx.load(str(path))
        meta = {
            "depth": str(d),
            "model_version": ckpt.version,
            "checkpoint_sha256": ckpt.sha256,
            "classes": json.dumps(list(ckpt.classes)),
            "input_size": json.dumps([pre.channels, pre.image_size, pre.image_size]),
            "mean": json.dumps(list(pre.mean)),
            "std": json.dumps(list(pre.std)),
        }
        for key, value in meta.items():
            graph.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
        onnx.save(graph, str(path))
        files[str(d)] = {"file": path.name, "sha256": _sha256(path)}
    model.train(False)
    manifest = {
        "format": FORMAT,
        "checkpoint_sha256": ckpt.sha256,
        "model_version": ckpt.version,
        "opset": opset,
        "torch": torch.__version__,
        "depths": files,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir / MANIFEST


def verified_export(ckpt: Checkpoint, out_dir: str | Path) -> dict[int, Path]:
    """The ONNX file of every depth, after checking the manifest against the checkpoint and each file's hash."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        raise OnnxExportError(f"no ONNX export in {out_dir} ({MANIFEST} is missing)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise OnnxExportError(f"{manifest_path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise OnnxExportError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("checkpoint_sha256") != ckpt.sha256:
        raise OnnxExportError(
            f"the ONNX export in {out_dir} is stale: it was made from checkpoint {str(manifest.get('checkpoint_sha256'))[:12]}…, "
            f"the loaded checkpoint is {ckpt.sha256[:12]}…; re-export with `puppet-cnn export-onnx`"
        )
    paths = {}
    for d in range(1, ckpt.config.max_depth + 1):
        entry = manifest.get("depths", {}).get(str(d))
        if entry is None:
            raise OnnxExportError(f"{manifest_path} has no graph for depth {d}")
        path = out_dir / entry["file"]
        if not path.is_file():
            raise OnnxExportError(f"ONNX file {path} is missing")
        if _sha256(path) != entry["sha256"]:
            raise OnnxExportError(f"ONNX file {path} does not match its manifest hash (corrupt or modified)")
        paths[d] = path
    return paths


def ensure_export(ckpt: Checkpoint, out_dir: str | Path) -> dict[int, Path]:
    """Reuse a valid export in out_dir, or (re)create it when missing or stale.

    Several processes may ask at once (serving workers): a lock file beside out_dir lets one export while
    the others wait, then find its export valid.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return verified_export(ckpt, out_dir)
        except OnnxExportError:
            export_onnx(ckpt, out_dir)
            return verified_export(ckpt, out_dir)
