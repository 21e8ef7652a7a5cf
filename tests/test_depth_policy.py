"""Calibration of the complexity -> depth table and how requests resolve against it."""

import pytest
import torch

from model import DepthPolicy, calibrate


def test_calibration_picks_the_smallest_depth_within_tolerance_per_bin():
    # 4 bins of 100 images. Bin 0: every depth right. Bin 1: only depth 3 right on 10 images.
    # Bin 2: depth 2 best, depth 3 worse (deeper is not always better). Bin 3: only depth 3 right.
    h = torch.arange(400, dtype=torch.float32)
    correct = torch.zeros(400, 3, dtype=torch.bool)
    correct[0:100] = True
    correct[100:200, :] = True
    correct[100:110, :2] = False
    correct[200:300, 1] = True
    correct[200:250, 2] = True
    correct[300:400, 2] = True
    policy = calibrate(h, correct, bins=4, tolerance=0.05)
    assert policy.depths == (1, 3, 2, 3)
    # with a looser tolerance bin 1 may go shallower: depth 1 loses 10 pt there
    assert calibrate(h, correct, bins=4, tolerance=0.11).depths == (1, 1, 2, 3)
    assert policy.edges == pytest.approx((99.75, 199.5, 299.25))
    torch.testing.assert_close(policy.auto(torch.tensor([0.0, 150.0, 250.0, 399.0])), torch.tensor([1, 3, 2, 3]))


def test_choose_precedence():
    """Requested beats degraded beats capped beats the table; each applies only where it lowers (or sets) the
    depth."""
    policy = DepthPolicy((5.0,), (2, 4), 4)
    table = policy.auto(torch.tensor([3.0, 6.0])).tolist()
    assert table == [2, 4]
    assert policy.choose(2) == (2, "auto")
    assert policy.choose(4) == (4, "auto")
    assert policy.choose(4, max_depth=3) == (3, "capped")
    assert policy.choose(2, max_depth=3) == (2, "auto")
    assert policy.choose(4, depth=1) == (1, "requested")
    assert policy.choose(1, depth=4, max_depth=2, degrade_to=1) == (4, "requested")
    assert policy.choose(4, degrade_to=1) == (1, "degraded")
    assert policy.choose(4, degrade_to=3, max_depth=2) == (2, "capped")  # the caller's cap holds under load too
    assert policy.choose(4, degrade_to=2, max_depth=3) == (2, "degraded")
    assert policy.choose(2, degrade_to=2, max_depth=1) == (1, "capped")
    assert policy.choose(1, degrade_to=2) == (1, "auto")


def test_invalid_tables_are_rejected():
    with pytest.raises(ValueError, match="len\\(edges\\) \\+ 1"):
        DepthPolicy((1.0,), (1,), 4)
    with pytest.raises(ValueError, match="must be in 1..4"):
        DepthPolicy((), (5,), 4)
    with pytest.raises(ValueError, match="increasing"):
        DepthPolicy((2.0, 1.0), (1, 2, 3), 4)


def test_dict_round_trip():
    policy = DepthPolicy((1.5, 2.5), (1, 2, 4), 4, 0.004)
    assert DepthPolicy.from_dict(policy.to_dict()) == policy
