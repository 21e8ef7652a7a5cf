"""Calibrating the depth routers on the validation split (never the test split) into curves of operating points.

Every depth's probabilities are computed once for the split; a router's outcome on the split is then gathered
from them (`simulate`), which is exactly what running the router image by image gives. Each router's curve keeps
its Pareto front (no point costs more for less accuracy); the learned router's, whose net is fitted on the split
itself, is scored out of fold (`learned_curve`). The default router and budget are the cheapest point
within `DEFAULT_BUDGET` x max depth's MACs whose validation accuracy is within `DEFAULT_TOLERANCE` of always max
depth's (`choose_default`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.checkpoint import Checkpoint
from model.complexity import complexity
from model.data import Dataset, load_dataset, split_train_val
from model.depth_policy import DepthPolicy
from model.predict import predict_all_depths
from model.routers import (
    CASCADE,
    ENTROPY,
    LEARNED,
    CascadeRouter,
    DifficultyNet,
    EntropyRouter,
    LearnedRouter,
    Router,
    RouterCatalog,
)

DEFAULT_BUDGET = 0.6  # of max depth's MACs: the most the default router may cost
DEFAULT_TOLERANCE = 0.001  # accuracy the default may give up against always max depth, on validation
ENTROPY_BINS = 4  # ~1,500 validation images a bin: a per-bin accuracy difference has ~0.3 pt standard error
# the learned router's hidden units (544 stored numbers for 4 depths), chosen for size: the router must fit in what
# the shipped puppet leaves under the target of ten times fewer stored numbers than the twin; out of fold, 16 units
# scored within noise of 8 (docs/training-experiments.md)
HIDDEN = 8
FOLDS = 5  # the learned router's validation curve is scored out of fold (`learned_curve`)
PENALTIES = [i / 400 for i in range(0, 201)]  # 0 .. 0.5 accuracy for max depth's MACs
THRESHOLDS = [i / 200 for i in range(60, 200)] + [0.9975, 0.999, 0.9995, 0.9999]


@dataclass
class SplitOutputs:
    """What a router needs of a split, computed once: images, H, every depth's probabilities (D, N, K), labels."""

    images: torch.Tensor
    complexity: torch.Tensor
    probabilities: torch.Tensor
    labels: torch.Tensor
    macs_by_depth: tuple[int, ...]

    @classmethod
    def of(cls, ckpt: Checkpoint, data: Dataset) -> SplitOutputs:
        logits = predict_all_depths(ckpt.model, data.images, ckpt.preprocessing)
        macs = tuple(ckpt.model.macs(d) for d in range(1, ckpt.config.max_depth + 1))
        return cls(data.images, complexity(data.images), logits.float().softmax(-1), data.labels, macs)

    def subset(self, index: torch.Tensor) -> SplitOutputs:
        """The same outputs for the images at `index` only."""
        return SplitOutputs(
            self.images[index],
            self.complexity[index],
            self.probabilities[:, index],
            self.labels[index],
            self.macs_by_depth,
        )

    @property
    def correct(self) -> torch.Tensor:
        """(N, D) bool: is depth d+1 right."""
        return (self.probabilities.argmax(-1) == self.labels).T

    @property
    def pixels(self) -> int:
        """Numbers in one image (channels x height x width): what the routers' own cost scales with."""
        return self.images[0].numel()


def simulate(router: Router, split: SplitOutputs) -> dict:
    """The router's decisions on a split: first and final depth, escalation, correctness and MACs per image."""
    n = len(split.labels)
    rows = torch.arange(n)
    first = router.first(split.images, split.complexity)
    second = router.escalate(split.probabilities[first - 1, rows], first)
    final = torch.where(second > 0, second, first)
    correct = split.probabilities[final - 1, rows].argmax(-1) == split.labels
    macs = torch.tensor(split.macs_by_depth, dtype=torch.float64)
    cost = macs[first - 1] + torch.where(second > 0, macs[(second - 1).clamp(min=0)], 0.0)
    cost = cost + router.router_macs(split.pixels)
    return {"first": first, "final": final, "escalated": second > 0, "correct": correct, "macs": cost}


def _point(router: Router, split: SplitOutputs) -> dict:
    out = simulate(router, split)
    return {
        "settings": router.settings(),
        "val_accuracy": float(out["correct"].float().mean()),
        "val_macs": float(out["macs"].mean()),
    }


def pareto(points: list[dict]) -> list[dict]:
    """Cheapest first, keeping only points more accurate than every cheaper one."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["val_macs"], -p["val_accuracy"])):
        if p["val_accuracy"] > best:
            front.append(p)
            best = p["val_accuracy"]
    return front


def entropy_curve(split: SplitOutputs, bins: int = ENTROPY_BINS) -> list[dict]:
    """Tables over `bins` quantile bins of H; for each penalty, each bin takes the depth that maximises its
    accuracy minus penalty x the depth's share of max depth's MACs (a budget-constrained fit)."""
    h, correct = split.complexity, split.correct.float()
    d_max = correct.shape[1]
    q = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    edges = torch.quantile(h.double(), q).float().unique()
    bin_of = torch.bucketize(h, edges, right=True)
    acc = torch.stack([correct[bin_of == b].mean(0) for b in range(len(edges) + 1)])  # (B, D); NaN: empty bin
    empty = acc.isnan().any(dim=1)  # a bin no image fell in (tied quantiles) runs at max depth
    cost = torch.tensor(split.macs_by_depth, dtype=torch.float32) / split.macs_by_depth[-1]
    tables = {
        tuple(torch.where(empty, d_max, (acc.nan_to_num(0.0) - lam * cost).argmax(1) + 1).tolist()) for lam in PENALTIES
    }
    edges_t = tuple(float(e) for e in edges)
    return pareto([_point(EntropyRouter(DepthPolicy(edges_t, t, d_max)), split) for t in sorted(tables)])


def fit_difficulty_net(split: SplitOutputs, *, hidden: int = HIDDEN, seed: int = 0, steps: int = 600) -> DifficultyNet:
    """Fit the learned router's net to per-depth correctness: 80% of the split fits, 20% picks the step (the
    lowest held-out binary cross-entropy). Full-batch Adam with weight decay; seeded."""
    g = torch.Generator().manual_seed(seed)
    feats = DifficultyNet.features(split.images, split.complexity)
    target = split.correct.float()
    perm = torch.randperm(len(feats), generator=g)
    cut = int(0.8 * len(feats))
    fit, hold = perm[:cut], perm[cut:]
    mean, std = feats[fit].mean(0), feats[fit].std(0).clamp(min=1e-6)
    torch.manual_seed(seed)
    w1 = (torch.randn(feats.shape[1], hidden, generator=g) / feats.shape[1] ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, target.shape[1], generator=g) / hidden**0.5).requires_grad_()
    b2 = torch.logit(target[fit].mean(0).clamp(0.01, 0.99)).clone().requires_grad_()
    opt = torch.optim.AdamW([w1, b1, w2, b2], lr=1e-2, weight_decay=1e-2)
    best, best_state = float("inf"), None
    for _ in range(steps):
        net = DifficultyNet(mean, std, w1, b1, w2, b2)
        loss = F.binary_cross_entropy_with_logits(net.logits(feats[fit]), target[fit])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            held = float(F.binary_cross_entropy_with_logits(net.logits(feats[hold]), target[hold]))
        if held < best:
            best, best_state = held, [t.detach().clone() for t in (w1, b1, w2, b2)]
    return DifficultyNet(mean, std, *best_state)


def out_of_fold_nets(
    split: SplitOutputs, *, folds: int = FOLDS, seed: int = 0, **fit
) -> list[tuple[torch.Tensor, DifficultyNet]]:
    """The split cut into `folds` parts (a seeded permutation of its size, whatever its labels), and for each part
    its indices and a net fitted on the other parts (`fit_difficulty_net`, with `fit`'s arguments)."""
    if not 2 <= folds <= len(split.labels):
        raise ValueError(f"folds must be in [2, {len(split.labels)}] (the split's images), got {folds}")
    perm = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))
    parts = perm.tensor_split(folds)
    out = []
    for k, part in enumerate(parts):
        rest = torch.cat([p for j, p in enumerate(parts) if j != k])
        out.append((part, fit_difficulty_net(split.subset(rest), seed=seed, **fit)))
    return out


def out_of_fold_front(split: SplitOutputs, *, folds: int = FOLDS, seed: int = 0, **fit) -> list[dict]:
    """Accuracy against MACs of learned routing with every image routed by a net fitted without it
    (`out_of_fold_nets`), one point a penalty, Pareto front."""
    cost = tuple(m / split.macs_by_depth[-1] for m in split.macs_by_depth)
    parts = [(split.subset(index), net) for index, net in out_of_fold_nets(split, folds=folds, seed=seed, **fit)]
    points = []
    for lam in PENALTIES:
        runs = [simulate(LearnedRouter(net, lam, cost), part) for part, net in parts]
        points.append(
            {
                "settings": {"penalty": lam},
                "val_accuracy": float(torch.cat([r["correct"] for r in runs]).float().mean()),
                "val_macs": float(torch.cat([r["macs"] for r in runs]).mean()),
            }
        )
    return pareto(points)


def joined_linearly(x: float, xs: list[float], ys: list[float]) -> float:
    """The polyline through (xs, ys), xs ascending, at `x`: linear between neighbours, flat beyond the ends. On
    accuracy against MACs, what a constant mix of two neighbouring routings costs and scores."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def learned_curve(split: SplitOutputs, net: DifficultyNet, *, folds: int = FOLDS, seed: int = 0, **fit) -> list[dict]:
    """The served net's operating points: each penalty's MACs are what `net` (fitted on the whole split) costs on
    it, which needs no label; its accuracy is the out-of-fold front's at those MACs (`out_of_fold_front`). Scored
    on the images it was fitted on, the net would flatter itself (its validation accuracy stood further above
    its test accuracy than the cascade's: docs/design.md); and the fold nets, fitted on fewer images, route
    differently at the same penalty (docs/design.md), so their own costs are not the served router's."""
    cost = tuple(m / split.macs_by_depth[-1] for m in split.macs_by_depth)
    front = out_of_fold_front(split, folds=folds, seed=seed, **fit)
    points = []
    for lam in PENALTIES:
        macs = float(simulate(LearnedRouter(net, lam, cost), split)["macs"].mean())
        accuracy = joined_linearly(macs, [p["val_macs"] for p in front], [p["val_accuracy"] for p in front])
        points.append({"settings": {"penalty": lam}, "val_accuracy": accuracy, "val_macs": macs})
    return pareto(points)


def cascade_curve(split: SplitOutputs) -> list[dict]:
    d_max = len(split.macs_by_depth)
    points = [
        _point(CascadeRouter(d1, d2, t, d_max), split)
        for d1 in range(1, d_max)
        for d2 in range(d1 + 1, d_max + 1)
        for t in THRESHOLDS
    ]
    return pareto(points)


def validation_split(ckpt: Checkpoint, data_dir: str | Path | None = None) -> Dataset:
    """The validation split the checkpoint was trained beside, rebuilt from its recipe."""
    r = ckpt.recipe
    data = load_dataset(ckpt.dataset or "fashion-mnist", "train", Path(data_dir) if data_dir else None)
    if r.get("limit"):
        data = data.subset(slice(0, r["limit"]))
    seed = r.get("split_seed")
    seed = int(r.get("seed", 0)) if seed is None else int(seed)
    _, val = split_train_val(data, min(int(r.get("val_size", 6000)), len(data) // 5), seed)
    return val


def fit_routers(ckpt: Checkpoint, val: Dataset, *, budget: float = DEFAULT_BUDGET, seed: int = 0) -> RouterCatalog:
    """Every router's curve on `val`, and the default router and budget (`choose_default`)."""
    split = SplitOutputs.of(ckpt, val)
    net = fit_difficulty_net(split, seed=seed)
    curves = {
        ENTROPY: entropy_curve(split),
        LEARNED: learned_curve(split, net, seed=seed),
        CASCADE: cascade_curve(split),
    }
    name, default_budget = choose_default(curves, split, budget)
    return RouterCatalog(curves, split.macs_by_depth, name, default_budget, net.to_dict())


def choose_default(curves: dict, split: SplitOutputs, budget: float, tolerance: float = DEFAULT_TOLERANCE):
    """The default router and budget, on validation: of every router's points within `budget` x max depth's MACs,
    the cheapest whose accuracy is within `tolerance` of always max depth's; when none is, the most accurate.
    The budget returned is that point's share of max depth's MACs, rounded up to 0.001."""
    macs_max = split.macs_by_depth[-1]
    acc_max = float(split.correct[:, -1].float().mean())
    within = [(n, p) for n, points in curves.items() for p in points if p["val_macs"] <= budget * macs_max]
    if not within:
        raise ValueError(f"no router point costs {budget} x max depth's MACs or less on validation")
    close = [(n, p) for n, p in within if p["val_accuracy"] >= acc_max - tolerance]
    if close:
        name, point = min(close, key=lambda np_: (np_[1]["val_macs"], -np_[1]["val_accuracy"]))
    else:
        name, point = max(within, key=lambda np_: (np_[1]["val_accuracy"], -np_[1]["val_macs"]))
    budget = math.ceil(1000 * point["val_macs"] / macs_max) / 1000
    catalog = RouterCatalog(curves, split.macs_by_depth, name, budget)
    if catalog.point(name) is not point:  # rounding up reached a dearer point: keep the exact share
        budget = point["val_macs"] / macs_max
    return name, budget
