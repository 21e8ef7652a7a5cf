"""Depth routers: which depth each image runs at. One interface, three routers.

  entropy  the paper's rule: the complexity score H (model/complexity.py) looked up in a table of a few bins.
  learned  a tiny net (`DifficultyNet`, under 2,000 stored numbers) reads the image and predicts how likely each
           depth is to be right; the depth chosen maximises that minus `penalty` x its share of max depth's MACs.
  cascade  run `first` depth; an image whose top-1 probability is below `threshold` runs again at `second`. Both
           passes count in the cost.

A router is calibrated on the validation split only (model/router_fit.py) into a curve of operating points:
each point is the router's settings with the validation accuracy and mean MACs they gave. The budget knob picks
a point: the most accurate one whose validation cost is at most `budget` x the MACs of max depth. The curves and
the default (router and budget, chosen on validation) live in the checkpoint's metadata.

Routers are pure functions of the images, the complexity and (for the cascade) the first pass's probabilities;
they run on the CPU in torch, so every backend routes alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.depth_policy import DepthPolicy

ENTROPY, LEARNED, CASCADE = "entropy", "learned", "cascade"
ROUTERS = (ENTROPY, LEARNED, CASCADE)
POOLED = 7  # the learned router reads the image average-pooled to 7 x 7
COMPLEXITY_MACS_PER_PIXEL = 18  # two 3x3 Sobel filters: what H costs, counted in the entropy and learned routers


def intensities(images: torch.Tensor) -> torch.Tensor:
    """uint8 levels or [0, 1] intensities (N, C, H, W) -> float32 intensities in [0, 1], channel mean (N, H, W)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x.mean(dim=1)


class Router:
    """The interface. `first` gives every image's depth before any pass; `escalate`, after the first pass, the
    depth of a second pass (0: none). Only images whose depth the router chose are offered to `escalate`."""

    name: str
    max_depth: int

    def first(self, images: torch.Tensor, complexity: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def escalate(self, probabilities: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(depths)

    def score(self, images: torch.Tensor, complexity: torch.Tensor, first_probabilities: torch.Tensor) -> torch.Tensor:
        """How hard the router judges each image (higher: harder), for its correlation with the loss."""
        raise NotImplementedError

    def router_macs(self, image_pixels: int) -> int:
        """What the routing decision itself costs an image of `image_pixels` numbers (C x H x W), in
        multiply-accumulates."""
        return COMPLEXITY_MACS_PER_PIXEL * image_pixels

    def settings(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class EntropyRouter(Router):
    policy: DepthPolicy
    name = ENTROPY

    @property
    def max_depth(self) -> int:
        return self.policy.max_depth

    def first(self, images: torch.Tensor, complexity: torch.Tensor) -> torch.Tensor:
        return self.policy.auto(complexity)

    def score(self, images, complexity, first_probabilities):
        return complexity

    def settings(self) -> dict:
        return {"edges": list(self.policy.edges), "depths": list(self.policy.depths)}

    @classmethod
    def from_settings(cls, s: dict, max_depth: int) -> EntropyRouter:
        return cls(DepthPolicy(tuple(s["edges"]), tuple(int(d) for d in s["depths"]), max_depth))


@dataclass(frozen=True)
class DifficultyNet:
    """features = [7x7 average-pooled intensities, H], standardised -> Linear -> ReLU -> Linear -> one logit a
    depth: the predicted probability that each depth classifies the image correctly."""

    mean: torch.Tensor  # (F,)
    std: torch.Tensor  # (F,)
    w1: torch.Tensor  # (F, hidden)
    b1: torch.Tensor  # (hidden,)
    w2: torch.Tensor  # (hidden, D)
    b2: torch.Tensor  # (D,)

    @staticmethod
    def features(images: torch.Tensor, complexity: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(intensities(images).unsqueeze(1), POOLED).flatten(1)
        return torch.cat([pooled, complexity.float().unsqueeze(1)], dim=1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        z = (features - self.mean) / self.std
        return torch.relu(z @ self.w1 + self.b1) @ self.w2 + self.b2

    def stored_numbers(self) -> int:
        return sum(t.numel() for t in (self.mean, self.std, self.w1, self.b1, self.w2, self.b2))

    def macs(self) -> int:
        f, hidden = self.w1.shape
        return f + f * hidden + hidden * self.w2.shape[1]

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("mean", "std", "w1", "b1", "w2", "b2")}

    @classmethod
    def from_dict(cls, d: dict) -> DifficultyNet:
        return cls(**{k: torch.tensor(d[k], dtype=torch.float32) for k in ("mean", "std", "w1", "b1", "w2", "b2")})


@dataclass(frozen=True)
class LearnedRouter(Router):
    net: DifficultyNet
    penalty: float  # accuracy (fraction) one image may give up for max depth's MACs; the budget knob's setting
    cost: tuple[float, ...]  # each depth's MACs as a share of max depth's
    name = LEARNED

    @property
    def max_depth(self) -> int:
        return len(self.cost)

    def first(self, images: torch.Tensor, complexity: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.net.logits(self.net.features(images, complexity)))
        utility = p - self.penalty * torch.tensor(self.cost)
        return utility.argmax(dim=1) + 1  # ties: the shallower depth

    def score(self, images, complexity, first_probabilities):
        return 1.0 - torch.sigmoid(self.net.logits(self.net.features(images, complexity)))[:, 0]

    def router_macs(self, image_pixels: int) -> int:
        return COMPLEXITY_MACS_PER_PIXEL * image_pixels + image_pixels + self.net.macs()

    def settings(self) -> dict:
        return {"penalty": self.penalty}


@dataclass(frozen=True)
class CascadeRouter(Router):
    first_depth: int
    second_depth: int
    threshold: float  # escalate when the first pass's top-1 probability is below this
    max_depth: int
    name = CASCADE

    def __post_init__(self):
        if not 1 <= self.first_depth < self.second_depth <= self.max_depth:
            raise ValueError(
                f"a cascade needs 1 <= first < second <= {self.max_depth}, got {self.first_depth} -> {self.second_depth}"
            )

    def first(self, images: torch.Tensor, complexity: torch.Tensor) -> torch.Tensor:
        return torch.full((len(images),), self.first_depth, dtype=torch.long)

    def escalate(self, probabilities: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
        unsure = (probabilities.max(dim=1).values < self.threshold) & (depths == self.first_depth)
        return torch.where(unsure, self.second_depth, 0)

    def score(self, images, complexity, first_probabilities):
        return 1.0 - first_probabilities.max(dim=1).values

    def router_macs(self, image_pixels: int) -> int:
        return 0  # the top-1 probability comes with the first pass

    def settings(self) -> dict:
        return {"first": self.first_depth, "second": self.second_depth, "threshold": self.threshold}


def build_router(name: str, settings: dict, *, max_depth: int, cost: tuple[float, ...], net: dict | None) -> Router:
    """A router from its name and one operating point's settings (as `Router.settings` wrote them)."""
    if name == ENTROPY:
        return EntropyRouter.from_settings(settings, max_depth)
    if name == LEARNED:
        if net is None:
            raise ValueError("the learned router needs its net's weights")
        return LearnedRouter(DifficultyNet.from_dict(net), float(settings["penalty"]), tuple(cost))
    if name == CASCADE:
        return CascadeRouter(int(settings["first"]), int(settings["second"]), float(settings["threshold"]), max_depth)
    raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")


@dataclass(frozen=True)
class RouterCatalog:
    """The calibrated routers of one checkpoint: per router its operating points (settings, validation accuracy,
    validation mean MACs), the learned router's weights, and the default router and budget chosen on validation.

    A checkpoint without a catalog (trained before routers existed) gets one from its entropy table alone."""

    curves: dict  # name -> list of {"settings", "val_accuracy", "val_macs"}, cheapest first
    macs_by_depth: tuple[int, ...]
    default_router: str = ENTROPY
    default_budget: float = 1.0
    net: dict | None = None

    @property
    def max_depth(self) -> int:
        return len(self.macs_by_depth)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in ROUTERS if self.curves.get(n))

    def point(self, name: str, budget: float | None = None) -> dict:
        """The most accurate point of `name` whose validation MACs are within `budget` x max depth's (the
        cheapest point when none is)."""
        if name not in self.names:
            raise ValueError(f"router {name!r} is not calibrated in this checkpoint; it has {', '.join(self.names)}")
        budget = self.default_budget if budget is None else budget
        points = self.curves[name]
        within = [p for p in points if p["val_macs"] <= budget * self.macs_by_depth[-1] * (1 + 1e-9)]
        if not within:
            return min(points, key=lambda p: p["val_macs"])
        return max(within, key=lambda p: (p["val_accuracy"], -p["val_macs"]))

    def router(self, name: str | None = None, budget: float | None = None) -> Router:
        """The router `name` (default: the checkpoint's) at its point for `budget` (default: the checkpoint's)."""
        name = name or self.default_router
        return self.build(name, self.point(name, budget))

    def build(self, name: str, point: dict) -> Router:
        """The router `name` at one of its operating points."""
        cost = tuple(m / self.macs_by_depth[-1] for m in self.macs_by_depth)
        return build_router(name, point["settings"], max_depth=self.max_depth, cost=cost, net=self.net)

    def to_dict(self) -> dict:
        return {
            "curves": self.curves,
            "macs_by_depth": list(self.macs_by_depth),
            "default_router": self.default_router,
            "default_budget": self.default_budget,
            "net": self.net,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RouterCatalog:
        return cls(
            d["curves"],
            tuple(int(m) for m in d["macs_by_depth"]),
            d["default_router"],
            float(d["default_budget"]),
            d.get("net"),
        )

    @classmethod
    def from_policy(cls, policy: DepthPolicy, macs_by_depth: tuple[int, ...]) -> RouterCatalog:
        point = {"settings": EntropyRouter(policy).settings(), "val_accuracy": float("nan"), "val_macs": 0.0}
        return cls({ENTROPY: [point]}, tuple(macs_by_depth), ENTROPY, 1.0)
