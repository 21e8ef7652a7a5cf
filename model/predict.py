"""A trained network over a set of images: its logits at every depth, for training's validation, the routers'
calibration (model/router_fit.py) and the model report (model/evaluate.py)."""

from __future__ import annotations

import torch

from model.checkpoint import Preprocessing
from model.puppet import Backbone


@torch.no_grad()
def predict_all_depths(
    model: Backbone, images: torch.Tensor, pre: Preprocessing, batch_size: int = 1000
) -> torch.Tensor:
    """Logits at every depth, (D, N, classes), with cached kernels, in eval mode."""
    model.eval()
    model.cache_kernels()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = pre.normalise(images[i : i + batch_size].to(device))
        out.append(torch.stack([model(x, d) for d in range(1, model.config.max_depth + 1)]).cpu())
    return torch.cat(out, dim=1)
