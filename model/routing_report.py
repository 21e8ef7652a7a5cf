"""The routers on the test split, against fixed depth at equal compute: the figures and the report's sections.

The comparison that matters is a fixed depth at equal cost: the fixed-depth curve is the linear interpolation
between neighbouring fixed depths (what a constant mix of those two depths costs and scores), and a router's
gain is its accuracy minus that curve's at the router's mean MACs. Routers are calibrated on the validation
split only (model/router_fit.py); everything here is measured on the test split.
"""

from __future__ import annotations

import statistics
import time

import torch

from model.checkpoint import Checkpoint
from model.complexity import complexity
from model.report_render import signed
from model.router_fit import SplitOutputs, joined_linearly, simulate
from model.routers import Router, RouterCatalog

BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def fixed_curve(macs: float, fixed_macs: list[float], fixed_acc: list[float]) -> float:
    """Accuracy of the fixed-depth curve at `macs`: linear between neighbouring depths, flat beyond the ends."""
    return joined_linearly(macs, fixed_macs, fixed_acc)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        uniq, inverse = torch.unique(x, return_inverse=True)  # average the ranks of tied values
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
        return (sums / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def routed_forward(ckpt: Checkpoint, images: torch.Tensor, router: Router, batch: int = 500) -> dict:
    """What the service does, image batch by image batch: the router's first depths through the per-sample-depth
    forward, then the escalated images again at their second depth. Final probabilities and depths."""
    model, pre = ckpt.model.eval(), ckpt.preprocessing
    model.cache_kernels()
    probs, first, final = [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        x = pre.normalise(chunk)
        d1 = router.first(chunk, complexity(chunk))
        p = model(x, d1).float().softmax(-1)
        d2 = router.escalate(p, d1)
        up = d2 > 0
        if up.any():
            p[up] = model(x[up], d2[up]).float().softmax(-1)
        probs.append(p)
        first.append(d1)
        final.append(torch.where(up, d2, d1))
    return {
        "probabilities": torch.cat(probs),
        "first": torch.cat(first),
        "final": torch.cat(final),
        "seconds": time.perf_counter() - t0,
    }


def _per_image_loss(split: SplitOutputs) -> torch.Tensor:
    """Cross-entropy of every image at every depth, (D, N)."""
    rows = torch.arange(len(split.labels))
    return -split.probabilities[:, rows, split.labels].clamp(min=1e-12).log()


def _curve(catalog: RouterCatalog, name: str, split: SplitOutputs, fixed_macs, fixed_acc) -> list[dict]:
    curve = []
    for p in catalog.curves[name]:
        o = simulate(catalog.build(name, p), split)
        acc, macs = float(o["correct"].float().mean()), float(o["macs"].mean())
        curve.append(
            p | {"test_accuracy": acc, "test_macs": macs, "gain": acc - fixed_curve(macs, fixed_macs, fixed_acc)}
        )
    return curve


def _at(catalog: RouterCatalog, name: str, budget: float, split: SplitOutputs, loss: torch.Tensor, fixed) -> dict:
    """One router at one budget on the test split: accuracy, cost, gain, depth shares, score-loss correlation."""
    point = catalog.point(name, budget)
    router = catalog.build(name, point)
    o = simulate(router, split)
    rows = torch.arange(len(split.labels))
    score = router.score(split.images, split.complexity, split.probabilities[o["first"] - 1, rows])
    acc, macs = float(o["correct"].float().mean()), float(o["macs"].mean())
    d_max = len(split.macs_by_depth)
    return {
        "budget": budget,
        "settings": point["settings"],
        "val_accuracy": point["val_accuracy"],
        "val_macs": point["val_macs"],
        "test_accuracy": acc,
        "test_macs": macs,
        "fixed_curve_accuracy": fixed_curve(macs, *fixed),
        "gain": acc - fixed_curve(macs, *fixed),
        "escalated_share": float(o["escalated"].float().mean()),
        "final_depth_share": [float((o["final"] == d).float().mean()) for d in range(1, d_max + 1)],
        "spearman_score_vs_loss_depth1": spearman(score, loss[0]),
        "spearman_score_vs_loss_max_depth": spearman(score, loss[-1]),
    }


def evaluate_routers(catalog: RouterCatalog, split: SplitOutputs, random_repeats: int = 100) -> dict:
    """Every router's test curve and its figures at each budget of `BUDGETS` and the default budget."""
    fixed_acc = split.correct.float().mean(0).tolist()
    fixed_macs = [float(m) for m in split.macs_by_depth]
    loss = _per_image_loss(split)
    budgets = sorted(set(BUDGETS) | {catalog.default_budget})
    routers = {
        name: {
            "curve": _curve(catalog, name, split, fixed_macs, fixed_acc),
            "at_budget": [_at(catalog, name, b, split, loss, (fixed_macs, fixed_acc)) for b in budgets],
        }
        for name in catalog.names
    }
    default = _at(catalog, catalog.default_router, catalog.default_budget, split, loss, (fixed_macs, fixed_acc))
    o = simulate(catalog.router(), split)
    random_accs = _random_depth_accuracies(split.correct, o["final"], random_repeats)
    return {
        "fixed": {"accuracy": fixed_acc, "macs": fixed_macs},
        "routers": routers,
        "default": default | {"router": catalog.default_router},
        "random_same_distribution": {
            "mean": statistics.mean(random_accs),
            "std": statistics.pstdev(random_accs),
            "macs": float(torch.tensor(fixed_macs, dtype=torch.float64)[o["final"] - 1].mean()),
        },
        "oracle": float(split.correct.any(dim=1).float().mean()),
    }


def _random_depth_accuracies(correct: torch.Tensor, depths: torch.Tensor, repeats: int) -> list[float]:
    """Accuracy when the final depths are shuffled across images: same depth distribution, no signal (seeded)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(len(depths))
    return [
        float(correct[rows, depths[torch.randperm(len(depths), generator=g)] - 1].float().mean())
        for _ in range(repeats)
    ]


def targets(report: dict) -> list[dict]:
    """The issue's five targets on the test split, each met or missed with the figures behind it."""
    r, d = report["routing"], report["routing"]["default"]
    acc_max, macs_max = r["fixed"]["accuracy"][-1], r["fixed"]["macs"][-1]
    rows = [
        ("default router >= 93.0% top-1", d["test_accuracy"] >= 0.930, f"{100 * d['test_accuracy']:.2f}%"),
        (
            "at most 0.1 pt below always-D_max at <= 60% of its MACs",
            d["test_accuracy"] >= acc_max - 0.001 and d["test_macs"] <= 0.6 * macs_max,
            f"{signed(100 * (d['test_accuracy'] - acc_max))} pt at {100 * d['test_macs'] / macs_max:.1f}% of the MACs",
        ),
        (
            ">= +0.3 pt above the fixed-depth curve at equal MACs",
            d["gain"] >= 0.003,
            f"{signed(100 * d['gain'])} pt",
        ),
    ]
    if "twin" in report:
        gap = report["twin"]["accuracy_max_depth"] - acc_max
        rows.append(("twin - puppet <= 1.0 pt", gap <= 0.010, f"{signed(100 * gap)} pt"))
        ratio = report["twin"]["stored_numbers"] / report["stored_numbers_with_routers"]
        rows.append(("stored numbers >= 10x fewer than the twin", ratio >= 10, f"{ratio:.2f}x"))
    return [{"target": t, "met": bool(m), "measured": v} for t, m, v in rows]
