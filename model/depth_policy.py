"""Complexity -> depth: a table calibrated on a held-out split and stored in the checkpoint.

The complexity axis is cut into bins at validation quantiles; each bin gets the smallest depth whose
accuracy in that bin is within `tolerance` of the best depth's accuracy in that bin. This works
whichever way complexity and difficulty correlate, and it bounds the validation accuracy lost against
the best depth per bin (hence against max depth) by `tolerance`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# why an image ran at its depth (the `depth_reason` of an answer, a label of the depth metrics)
AUTO, REQUESTED, CAPPED, DEGRADED = "auto", "requested", "capped", "degraded"


@dataclass(frozen=True)
class DepthPolicy:
    """edges[i] separates bin i from bin i+1; depths[i] is bin i's depth."""

    edges: tuple[float, ...]
    depths: tuple[int, ...]
    max_depth: int
    tolerance: float = 0.0

    def __post_init__(self):
        if len(self.depths) != len(self.edges) + 1:
            raise ValueError(
                f"a depth table needs len(edges) + 1 depths, got {len(self.edges)} edges, {len(self.depths)} depths"
            )
        if any(not 1 <= d <= self.max_depth for d in self.depths):
            raise ValueError(f"table depths {self.depths} must be in 1..{self.max_depth}")
        if list(self.edges) != sorted(self.edges):
            raise ValueError(f"table edges must be increasing, got {self.edges}")

    @classmethod
    def constant(cls, max_depth: int) -> DepthPolicy:
        return cls(edges=(), depths=(max_depth,), max_depth=max_depth)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DepthPolicy:
        return cls(tuple(d["edges"]), tuple(int(x) for x in d["depths"]), int(d["max_depth"]), float(d["tolerance"]))

    def auto(self, complexity: torch.Tensor) -> torch.Tensor:
        """Table depth per image, LongTensor shaped like `complexity`."""
        edges = torch.tensor(self.edges, dtype=complexity.dtype, device=complexity.device)
        table = torch.tensor(self.depths, dtype=torch.long, device=complexity.device)
        return table[torch.bucketize(complexity, edges, right=True)]

    def choose(
        self, auto: int, *, depth: int | None = None, max_depth: int | None = None, degrade_to: int | None = None
    ) -> tuple[int, str]:
        """The depth one image runs at, and why, given its table depth `auto`. The precedence, defined here only:
        a requested `depth` wins; else, under load, a table depth deeper than `degrade_to` drops to it; and the
        caller's `max_depth` caps what remains. The caller has checked that the depths it passes are in
        1..max_depth."""
        if depth is not None:
            return depth, REQUESTED
        chosen, reason = auto, AUTO
        if degrade_to is not None and chosen > degrade_to:
            chosen, reason = degrade_to, DEGRADED
        if max_depth is not None and chosen > max_depth:  # a degrade depth above the caller's cap must not win
            chosen, reason = max_depth, CAPPED
        return chosen, reason


def calibrate(
    complexity: torch.Tensor, correct: torch.Tensor, *, bins: int = 8, tolerance: float = 0.005
) -> DepthPolicy:
    """Calibrate a table on a validation split.

    Args:
        complexity: H of each validation image, (N,).
        correct: whether each image is classified correctly at depth d+1, bool (N, D).
        bins: number of complexity bins (quantiles of `complexity`).
        tolerance: accuracy (fraction, not points) a bin may give up for a shallower depth.
    """
    n, max_depth = correct.shape
    if complexity.shape != (n,):
        raise ValueError(f"complexity must have shape ({n},), got {tuple(complexity.shape)}")
    q = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    edges = torch.quantile(complexity.double(), q).float().unique()
    bin_of = torch.bucketize(complexity, edges, right=True)
    depths = []
    for b in range(len(edges) + 1):
        members = bin_of == b
        if not members.any():
            depths.append(max_depth)
            continue
        acc = correct[members].float().mean(dim=0)  # (D,)
        ok = (acc >= acc.max() - tolerance).nonzero()
        depths.append(int(ok[0]) + 1)
    return DepthPolicy(tuple(float(e) for e in edges), tuple(depths), max_depth, tolerance)
