"""Checkpoint I/O: weights in safetensors, metadata as JSON inside the safetensors header.

One file carries everything the serving side needs to rebuild the model and preprocess its inputs:
architecture, class names, input size, mean/std, the complexity->depth table, dataset, recipe,
measured metrics, version. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.depth_policy import DepthPolicy
from model.puppet import Backbone, PuppetConfig, build_model
from model.routers import RouterCatalog

FORMAT = "puppet-cnn/1"
_META_KEY = "puppet_cnn"
# the model this repository ships: the default of `puppet-cnn evaluate`/`export-onnx` and of the service
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "puppet-cnn-fmnist.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or does not match its architecture; the message names the file."""


@dataclass
class Preprocessing:
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images (B, C, H, W) -> normalised float32."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


@dataclass
class Checkpoint:
    """A model together with everything needed to serve it."""

    model: Backbone
    kind: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    policy: DepthPolicy
    version: str
    dataset: str = ""
    recipe: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""
    routers: RouterCatalog | None = None  # None: only the entropy table (`policy`), as before routers existed

    @property
    def catalog(self) -> RouterCatalog:
        """The calibrated routers; for a checkpoint without them, the entropy router on its depth table."""
        if self.routers is not None:
            return self.routers
        macs = tuple(self.model.macs(d) for d in range(1, self.config.max_depth + 1))
        return RouterCatalog.from_policy(self.policy, macs)

    @property
    def config(self) -> PuppetConfig:
        return self.model.config

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "version": self.version,
            "architecture": self.config.to_dict(),
            "classes": list(self.classes),
            "preprocessing": {
                "image_size": self.preprocessing.image_size,
                "channels": self.preprocessing.channels,
                "mean": list(self.preprocessing.mean),
                "std": list(self.preprocessing.std),
            },
            "depth_policy": self.policy.to_dict(),
            "dataset": self.dataset,
            "recipe": self.recipe,
            "metrics": self.metrics,
        } | ({"routers": self.routers.to_dict()} if self.routers is not None else {})


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(ckpt.metadata(), sort_keys=True)})
    tmp.replace(path)  # never leave a half-written checkpoint under the real name
    ckpt.path, ckpt.sha256 = path, file_sha256(path)
    return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint, without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e
    if raw is None:
        raise CheckpointError(f"checkpoint {path} has no puppet-cnn metadata; it was not written by save_checkpoint")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has malformed metadata JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}; this code reads {FORMAT!r}")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the checkpoint alone and load its weights, in eval mode on `device`."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        config = PuppetConfig.from_dict(meta["architecture"])
        model = build_model(meta["kind"], config)
        pre = meta["preprocessing"]
        preprocessing = Preprocessing(
            int(pre["image_size"]), int(pre["channels"]), tuple(pre["mean"]), tuple(pre["std"])
        )
        policy = DepthPolicy.from_dict(meta["depth_policy"])
        routers = RouterCatalog.from_dict(meta["routers"]) if "routers" in meta else None
        classes = tuple(meta["classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has invalid metadata: {e!r}") from e
    if len(classes) != config.num_classes:
        raise CheckpointError(f"checkpoint {path} lists {len(classes)} classes for a {config.num_classes}-class head")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt?): {e}") from e
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match its architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"checkpoint {path}: tensor {k} has shape {tuple(v.shape)}, the architecture needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict(tensors)
    model.to(device).eval()
    return Checkpoint(
        model=model,
        kind=meta["kind"],
        classes=classes,
        preprocessing=preprocessing,
        policy=policy,
        version=str(meta["version"]),
        dataset=meta.get("dataset", ""),
        recipe=meta.get("recipe", {}),
        metrics=meta.get("metrics", {}),
        path=path,
        sha256=file_sha256(path),
        routers=routers,
    )
