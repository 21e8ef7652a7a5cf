"""Checkpoints with a router catalog built by hand, for the tests of routing in the service.

A small random puppet (28x28 grey, 10 classes, 3 depths, so real Fashion-MNIST images serve as they are) and a
`RouterCatalog` with one operating point for each router unless a test asks for more. The validation figures are
made up: the service only reports them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model import Checkpoint, DepthPolicy, Preprocessing, PuppetCNN, PuppetConfig, load_checkpoint, save_checkpoint
from model.routers import POOLED, DifficultyNet, EntropyRouter, RouterCatalog

CLASSES = tuple(f"class-{i}" for i in range(10))
CONFIG = PuppetConfig(widths=(4, 8), ranks=(2, 4), max_depth=3, image_size=28, num_classes=10)
PREPROCESSING = Preprocessing(28, 1, (0.286,), (0.353,))


def small_model(seed: int = 0) -> PuppetCNN:
    """A random puppet whose batch norms have real statistics, so every depth answers differently."""
    torch.manual_seed(seed)
    model = PuppetCNN(CONFIG)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.3
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return model.eval()


def difficulty_net(max_depth: int, seed: int = 0, hidden: int = 4) -> dict:
    """A random learned-router net over the 7x7 pooled image and H: its first depths vary with the image."""
    g = torch.Generator().manual_seed(seed)
    features = POOLED * POOLED + 1
    mean = torch.full((features,), 0.3)
    mean[-1] = 4.0
    std = torch.full((features,), 0.3)
    std[-1] = 1.0
    net = DifficultyNet(
        mean,
        std,
        torch.randn(features, hidden, generator=g),
        torch.randn(hidden, generator=g),
        torch.randn(hidden, max_depth, generator=g),
        torch.zeros(max_depth),
    )
    return net.to_dict()


def macs_by_depth(model: PuppetCNN) -> tuple[int, ...]:
    return tuple(model.macs(d) for d in range(1, model.config.max_depth + 1))


def point(settings: dict, accuracy: float, macs_share: float, macs: tuple[int, ...]) -> dict:
    return {"settings": settings, "val_accuracy": accuracy, "val_macs": macs_share * macs[-1]}


def catalog(
    model: PuppetCNN,
    *,
    policy: DepthPolicy,
    cascade: tuple[int, int, float] = (1, 3, 0.5),
    default: str = "cascade",
    default_budget: float = 1.0,
    learned: list[tuple[float, float, float]] | None = None,
) -> RouterCatalog:
    """Every router with one point (the learned router: `learned`, as (penalty, accuracy, MACs share) each)."""
    macs = macs_by_depth(model)
    first, second, threshold = cascade
    curves = {
        "entropy": [point(EntropyRouter(policy).settings(), 0.80, 0.55, macs)],
        "learned": [point({"penalty": p}, a, m, macs) for p, a, m in (learned or [(0.05, 0.82, 0.6)])],
        "cascade": [point({"first": first, "second": second, "threshold": threshold}, 0.83, 0.65, macs)],
    }
    return RouterCatalog(curves, macs, default, default_budget, difficulty_net(len(macs)))


def policy_for(complexity: torch.Tensor) -> DepthPolicy:
    """A depth table with a bin for each depth, cut at the terciles of these images' H."""
    edges = torch.quantile(complexity.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)).float()
    return DepthPolicy(tuple(float(e) for e in edges), (2, 1, 3), CONFIG.max_depth, 0.0)


def save_routed_checkpoint(
    path: Path, policy: DepthPolicy, routers: RouterCatalog | None, model: PuppetCNN | None = None
) -> Checkpoint:
    """Save a servable small checkpoint (with `routers` in its metadata, or none) and load it back, hashed."""
    ckpt = Checkpoint(
        model=model or small_model(),
        kind="puppet",
        classes=CLASSES,
        preprocessing=PREPROCESSING,
        policy=policy,
        version="routing-test-1",
        dataset="fashion-mnist",
        routers=routers,
    )
    save_checkpoint(ckpt, path)
    return load_checkpoint(path)


def with_routers(source: str | Path, path: Path, routers: RouterCatalog) -> Checkpoint:
    """A copy of a checkpoint (the shipped one) with `routers` in its metadata, loaded back."""
    ckpt = load_checkpoint(source)
    ckpt.routers = routers
    save_checkpoint(ckpt, path)
    return load_checkpoint(path)


def direct(ckpt: Checkpoint, images: torch.Tensor, depths: torch.Tensor | list[int]) -> torch.Tensor:
    """Softmax probabilities of a direct model call, image by image at its own depth."""
    x = ckpt.preprocessing.normalise(images)
    with torch.inference_mode():
        return torch.cat([torch.softmax(ckpt.model(x[i : i + 1], int(d)), -1) for i, d in enumerate(depths)])
