"""Depth routers: their decisions, their calibration on validation, and the test-split comparison's arithmetic."""

import itertools
import math

import pytest
import torch

from model import Preprocessing, complexity
from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.depth_policy import DepthPolicy
from model.router_fit import (
    SplitOutputs,
    cascade_curve,
    choose_default,
    entropy_curve,
    fit_difficulty_net,
    fit_routers,
    joined_linearly,
    learned_curve,
    out_of_fold_front,
    out_of_fold_nets,
    pareto,
    simulate,
)
from model.routers import (
    CASCADE,
    ENTROPY,
    LEARNED,
    CascadeRouter,
    DifficultyNet,
    EntropyRouter,
    RouterCatalog,
)
from model.routing_report import fixed_curve, routed_forward, spearman


def _images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Images from blank to busy, so H spreads over its range."""
    g = torch.Generator().manual_seed(seed)
    busy = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    keep = torch.rand(n, 1, size, size, generator=g) < torch.linspace(0, 1, n).view(n, 1, 1, 1)
    return torch.where(keep, busy, torch.zeros_like(busy))


@pytest.fixture
def ckpt(small_puppet):
    pre = Preprocessing(12, 1, (0.3,), (0.3,))
    policy = DepthPolicy((3.0,), (1, 3), 3)
    return Checkpoint(small_puppet, "puppet", tuple("abcde"), pre, policy, "test-v1", recipe={"val_size": 100})


@pytest.fixture
def split(ckpt):
    images = _images(300)
    labels = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(3))
    from model.data import Dataset

    return SplitOutputs.of(ckpt, Dataset(images, labels, tuple("abcde"), "synthetic"))


def test_cascade_escalates_exactly_the_unsure_images_of_its_first_depth():
    r = CascadeRouter(1, 3, 0.6, 3)
    probs = torch.tensor([[0.59, 0.41], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    depths = torch.tensor([1, 1, 2, 1])
    assert r.escalate(probs, depths).tolist() == [3, 0, 0, 0]  # below, at (not below), not its first depth, sure
    assert r.first(_images(4), torch.zeros(4)).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="first < second"):
        CascadeRouter(3, 3, 0.5, 3)


def test_learned_router_trades_predicted_correctness_against_cost():
    f = 7 * 7 + 1
    net = DifficultyNet(
        torch.zeros(f),
        torch.ones(f),
        torch.zeros(f, 2),
        torch.zeros(2),
        torch.zeros(2, 3),
        torch.tensor([0.0, 1.0, 2.0]),
    )
    # P(right) = sigmoid(0, 1, 2) = 0.5, 0.73, 0.88 at depths 1..3 for every image
    from model.routers import LearnedRouter

    images, h = _images(5), torch.zeros(5)
    cost = (1 / 3, 2 / 3, 1.0)
    assert LearnedRouter(net, 0.0, cost).first(images, h).tolist() == [3] * 5
    assert LearnedRouter(net, 0.5, cost).first(images, h).tolist() == [2] * 5  # 0.73 - 0.33 > 0.88 - 0.5
    assert LearnedRouter(net, 2.0, cost).first(images, h).tolist() == [1] * 5
    assert net.stored_numbers() == 2 * f + 2 * f + 2 + 2 * 3 + 3


def test_simulation_equals_the_real_routed_forward_for_every_router(ckpt, split):
    """What calibration and the report compute from per-depth outputs is what running the router does."""
    net = fit_difficulty_net(split, hidden=4, steps=30)
    cost = tuple(m / split.macs_by_depth[-1] for m in split.macs_by_depth)
    from model.routers import LearnedRouter

    routers = [
        EntropyRouter(DepthPolicy((float(split.complexity.median()),), (1, 3), 3)),
        LearnedRouter(net, 0.05, cost),
        CascadeRouter(1, 3, float(split.probabilities[0].max(-1).values.median()), 3),  # half escalate
    ]
    for router in routers:
        sim = simulate(router, split)
        real = routed_forward(ckpt, split.images, router, batch=64)
        assert torch.equal(sim["final"], real["final"]), router.name
        assert torch.equal(sim["correct"], real["probabilities"].argmax(-1) == split.labels), router.name
    escalated = simulate(routers[2], split)["escalated"]
    assert 0 < int(escalated.sum()) < len(escalated)  # the cascade case really has both kinds of image


def test_cascade_cost_counts_both_passes(split):
    macs = split.macs_by_depth
    out = simulate(CascadeRouter(1, 3, 1.01, 3), split)  # everything escalates
    assert out["escalated"].all() and torch.allclose(
        out["macs"], torch.full((300,), float(macs[0] + macs[2]), dtype=torch.float64)
    )
    out = simulate(CascadeRouter(1, 3, 0.0, 3), split)  # nothing does
    assert not out["escalated"].any() and (out["macs"] == macs[0]).all()


def test_entropy_and_learned_routers_cost_their_own_decision(split):
    px = split.pixels  # 12 x 12 grey
    out = simulate(EntropyRouter(DepthPolicy.constant(3)), split)
    assert (out["macs"] == split.macs_by_depth[2] + 18 * 144).all()  # two 3x3 Sobel filters a pixel
    net = fit_difficulty_net(split, hidden=4, steps=5)
    cost = tuple(m / split.macs_by_depth[-1] for m in split.macs_by_depth)
    from model.routers import LearnedRouter

    out = simulate(LearnedRouter(net, 0.0, cost), split)
    own = 18 * px + px + (50 + 50 * 4 + 4 * 3)  # H, pooling, standardising, two layers
    macs = torch.tensor(split.macs_by_depth, dtype=torch.float64)
    assert torch.equal(out["macs"], macs[out["first"] - 1] + own)


def test_pareto_keeps_only_points_that_buy_accuracy():
    pts = [
        {"val_macs": 3, "val_accuracy": 0.9},
        {"val_macs": 1, "val_accuracy": 0.8},
        {"val_macs": 2, "val_accuracy": 0.8},
        {"val_macs": 4, "val_accuracy": 0.95},
    ]
    assert [(p["val_macs"], p["val_accuracy"]) for p in pareto(pts)] == [(1, 0.8), (3, 0.9), (4, 0.95)]


def test_entropy_curve_spans_cheapest_to_best_per_bin(split):
    curve = entropy_curve(split, bins=2)
    assert curve[0]["settings"]["depths"] == [1, 1]  # the largest penalty: depth 1 everywhere
    correct = split.correct.float()
    edges = curve[-1]["settings"]["edges"]
    bins = torch.bucketize(split.complexity, torch.tensor(edges), right=True)
    best = [int(correct[bins == b].mean(0).argmax()) + 1 for b in range(len(edges) + 1)]
    assert curve[-1]["settings"]["depths"] == best  # penalty 0: each bin's most accurate depth
    assert all(
        a["val_macs"] < b["val_macs"] and a["val_accuracy"] < b["val_accuracy"] for a, b in itertools.pairwise(curve)
    )


def test_the_cascade_curve_dominates_every_cascade_it_tried(split):
    """Against brute force over the grid: no cascade tried is cheaper and more accurate than a curve point."""
    from model.router_fit import THRESHOLDS, _point

    curve = cascade_curve(split)
    tried = [_point(CascadeRouter(d1, d2, t, 3), split) for d1 in (1, 2) for d2 in range(d1 + 1, 4) for t in THRESHOLDS]
    assert max(p["val_accuracy"] for p in curve) == max(p["val_accuracy"] for p in tried)
    for p in tried:
        assert any(c["val_macs"] <= p["val_macs"] and c["val_accuracy"] >= p["val_accuracy"] for c in curve), p
    assert all(a["val_macs"] < b["val_macs"] for a, b in itertools.pairwise(curve))


def test_the_difficulty_net_learns_a_signal_it_can_see():
    """Depth 1 is right exactly on dark images: the net must rank dark images as easy."""
    images = _images(400, size=28)
    h = complexity(images)
    dark = images.float().mean(dim=(1, 2, 3)) < images.float().mean()
    correct = torch.stack([dark, torch.ones(400, dtype=torch.bool)], dim=1)
    probs = torch.zeros(2, 400, 2)
    probs[0, :, 0] = dark.float()
    probs[0, :, 1] = 1 - dark.float()
    probs[1, :, 0] = 1.0
    split = SplitOutputs(images, h, probs, torch.zeros(400, dtype=torch.long), (10, 20))
    assert torch.equal(split.correct, correct)
    net = fit_difficulty_net(split, hidden=8, steps=300)
    p1 = torch.sigmoid(net.logits(DifficultyNet.features(images, h)))[:, 0]
    assert spearman(p1, dark.float()) > 0.8


def _signal_split(n: int = 400) -> SplitOutputs:
    """Depth 1 is right on dark images (10 % flipped), depth 2 on dark ones and half the rest, depth 3 on all:
    a signal the learned router can see, so its curve has several points."""
    g = torch.Generator().manual_seed(5)
    images = _images(n, size=28)
    dark = images.float().mean(dim=(1, 2, 3)) < images.float().mean()
    right = torch.stack(
        [
            dark ^ (torch.rand(n, generator=g) < 0.1),
            dark | (torch.rand(n, generator=g) < 0.5),
            torch.ones(n, dtype=torch.bool),
        ]
    )
    probs = torch.stack([right.float(), 1 - right.float()], dim=-1)  # (3, N, 2): label 0 where right
    return SplitOutputs(images, complexity(images), probs, torch.zeros(n, dtype=torch.long), (10, 20, 30))


def test_out_of_fold_nets_never_see_the_images_they_route(split):
    """Relabel one fold: its own net is bit-identical (it was fitted without those images), every other net
    changes; and the folds cover the split, each image once."""
    relabelled = split.labels.clone()
    nets = out_of_fold_nets(split, folds=3, hidden=4, steps=40)
    index = nets[0][0]
    relabelled[index] = (relabelled[index] + 1) % 5  # fold 0's correctness changes wherever a depth was right
    other = SplitOutputs(split.images, split.complexity, split.probabilities, relabelled, split.macs_by_depth)
    assert not torch.equal(other.correct[index], split.correct[index])
    again = out_of_fold_nets(other, folds=3, hidden=4, steps=40)
    weights = [[(n.w1, n.b1, n.w2, n.b2, n.mean, n.std) for _, n in run] for run in (nets, again)]
    assert all(torch.equal(a, b) for a, b in zip(weights[0][0], weights[1][0], strict=True))
    for k in (1, 2):
        assert torch.equal(nets[k][0], again[k][0])  # the folds depend on the split's size and seed only
        assert not torch.equal(weights[0][k][2], weights[1][k][2])
    assert sorted(torch.cat([i for i, _ in nets]).tolist()) == list(range(len(split.labels)))
    with pytest.raises(ValueError, match="folds"):
        out_of_fold_nets(split, folds=1)


def test_the_learned_curve_prices_the_served_net_and_scores_it_out_of_fold():
    """Each point costs what the served net (fitted on the whole split) costs at its penalty, and scores the
    out-of-fold front's accuracy at that cost; the front pools the fold nets' decisions on their own folds."""
    from model.routers import LearnedRouter

    split = _signal_split()
    fit = {"hidden": 4, "steps": 150}
    served = fit_difficulty_net(split, **fit)
    curve = learned_curve(split, served, folds=4, **fit)
    front = out_of_fold_front(split, folds=4, **fit)
    assert len(curve) >= 3 and len(front) >= 3
    cost = (1 / 3, 2 / 3, 1.0)
    xs, ys = [p["val_macs"] for p in front], [p["val_accuracy"] for p in front]
    for point in curve:
        macs = simulate(LearnedRouter(served, point["settings"]["penalty"], cost), split)["macs"].mean()
        assert point["val_macs"] == float(macs)
        assert point["val_accuracy"] == joined_linearly(point["val_macs"], xs, ys)
    nets = out_of_fold_nets(split, folds=4, **fit)
    for point in front:
        runs = [simulate(LearnedRouter(n, point["settings"]["penalty"], cost), split.subset(i)) for i, n in nets]
        assert point["val_accuracy"] == float(torch.cat([r["correct"] for r in runs]).float().mean())
        assert point["val_macs"] == float(torch.cat([r["macs"] for r in runs]).mean())
    # the served net scored in-sample would claim more than out of fold somewhere on the front
    in_sample = [
        simulate(LearnedRouter(served, p["settings"]["penalty"], cost), split)["correct"].float().mean() for p in curve
    ]
    assert any(float(a) > p["val_accuracy"] for a, p in zip(in_sample, curve, strict=True))


def test_budget_picks_the_most_accurate_point_within_it():
    curve = [
        {"settings": {"first": 1, "second": 2, "threshold": 0.5}, "val_accuracy": 0.90, "val_macs": 12.0},
        {"settings": {"first": 1, "second": 2, "threshold": 0.9}, "val_accuracy": 0.92, "val_macs": 16.0},
    ]
    cat = RouterCatalog({CASCADE: curve}, (10, 20), CASCADE, 0.7)
    assert cat.point(CASCADE)["val_macs"] == 12.0  # 16 > 0.7 x 20
    assert cat.point(CASCADE, 0.8)["val_macs"] == 16.0
    assert cat.point(CASCADE, 0.1)["val_macs"] == 12.0  # nothing within: the cheapest
    assert cat.router(budget=0.8).threshold == 0.9
    with pytest.raises(ValueError, match="not calibrated"):
        cat.point(LEARNED)


def test_default_is_the_cheapest_point_close_to_max_depth_within_the_budget():
    class Split:
        macs_by_depth = (10, 20)
        correct = torch.tensor([[False, True]] * 9 + [[True, False]])  # always depth 2: 0.9

    curves = {
        ENTROPY: [{"settings": {}, "val_accuracy": 0.8995, "val_macs": 11.0}],
        CASCADE: [
            {"settings": {}, "val_accuracy": 0.899, "val_macs": 10.5},
            {"settings": {}, "val_accuracy": 0.95, "val_macs": 13.0},
        ],
    }
    assert choose_default(curves, Split, 0.6) == (CASCADE, 0.525)  # 0.899 is within 0.1 pt of 0.9
    # none within 0 pt and 0.6 (13 MACs is 0.65): the most accurate within the budget
    assert choose_default(curves, Split, 0.6, tolerance=0.0) == (ENTROPY, 0.55)
    assert choose_default(curves, Split, 0.7, tolerance=0.0) == (CASCADE, 0.65)
    with pytest.raises(ValueError, match="no router point"):
        choose_default(curves, Split, 0.01)


def test_a_calibrated_catalog_survives_the_checkpoint(ckpt, split, tmp_path):
    from model.data import Dataset

    val = Dataset(split.images, split.labels, tuple("abcde"), "synthetic")
    ckpt.routers = fit_routers(ckpt, val, budget=1.0)
    assert set(ckpt.routers.names) == {ENTROPY, LEARNED, CASCADE}
    assert DifficultyNet.from_dict(ckpt.routers.net).stored_numbers() <= 2000
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "c.safetensors"))
    assert loaded.routers.to_dict() == ckpt.routers.to_dict()
    for name in loaded.routers.names:
        a, b = simulate(loaded.routers.router(name), split), simulate(ckpt.routers.router(name), split)
        assert torch.equal(a["final"], b["final"])


def test_a_checkpoint_without_routers_routes_by_its_table(ckpt):
    router = ckpt.catalog.router()
    assert ckpt.catalog.names == (ENTROPY,) and router.policy == ckpt.policy
    h = torch.tensor([1.0, 5.0])
    assert router.first(_images(2), h).tolist() == ckpt.policy.auto(h).tolist()


def test_the_fixed_depth_curve_interpolates_between_neighbours():
    macs, acc = [10.0, 20.0, 40.0], [0.8, 0.9, 0.95]
    assert fixed_curve(15.0, macs, acc) == pytest.approx(0.85)
    assert fixed_curve(30.0, macs, acc) == pytest.approx(0.925)
    assert fixed_curve(5.0, macs, acc) == 0.8 and fixed_curve(50.0, macs, acc) == 0.95
    assert fixed_curve(20.0, macs, acc) == pytest.approx(0.9)


def test_spearman_against_known_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties get average ranks: [1, 2.5, 2.5, 4] against [1, 2, 3, 4]
    expected = 4.5 / math.sqrt(4.5 * 5)  # centred ranks [-1.5, 0, 0, 1.5] and [-1.5, -0.5, 0.5, 1.5]
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), a) == pytest.approx(expected)


def test_the_validation_split_is_rebuilt_from_the_recipe(ckpt):
    """Routers are calibrated on the split training held out: its seed is the split seed, else the seed."""
    from model.data import load_dataset, split_train_val
    from model.router_fit import validation_split

    data = load_dataset("fashion-mnist", "train").subset(slice(0, 1000))
    _, seed0 = split_train_val(data, 200, 0)
    _, seed1 = split_train_val(data, 200, 1)
    for recipe, expected in (
        ({"limit": 1000, "val_size": 200, "seed": 1}, seed1),
        ({"limit": 1000, "val_size": 200, "seed": 1, "split_seed": 0}, seed0),
    ):
        ckpt.recipe, ckpt.dataset = recipe, "fashion-mnist"
        assert torch.equal(validation_split(ckpt).labels, expected.labels)
        assert torch.equal(validation_split(ckpt).images, expected.images)
    assert not torch.equal(seed0.images, seed1.images)
