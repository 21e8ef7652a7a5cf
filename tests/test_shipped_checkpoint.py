"""Regression guard for the shipped model: its recorded figures still hold on this code."""

import json
import os

import pytest

from conftest import REPO
from model import SHIPPED_CHECKPOINT, load_checkpoint, load_dataset
from model.evaluate import REGRESSION_SLICE
from model.routers import DifficultyNet
from model.routing_report import routed_forward

CHECKPOINTS = os.path.join(REPO, "checkpoints")
REPORT = os.path.join(REPO, "docs", "model-report.json")


@pytest.fixture(scope="module")
def report():
    with open(REPORT) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(SHIPPED_CHECKPOINT)


def test_report_describes_the_shipped_checkpoint(report, shipped):
    assert report["sha256"] == shipped.sha256, (
        "docs/model-report.json was written for another checkpoint: re-run make evaluate"
    )
    assert report["version"] == shipped.version


def test_accuracy_on_a_fixed_test_slice_matches_the_recorded_figure(report, shipped):
    """The served default router, both passes of a cascade included, on the first test images."""
    test = load_dataset("fashion-mnist", "test").subset(slice(0, REGRESSION_SLICE))
    routed = routed_forward(shipped, test.images, shipped.catalog.router())
    accuracy = float((routed["probabilities"].argmax(-1) == test.labels).float().mean())
    recorded = report["regression_slice"]["accuracy_routed"]
    assert report["regression_slice"]["images"] == REGRESSION_SLICE
    assert abs(accuracy - recorded) <= 0.005, f"accuracy {accuracy:.4f} against recorded {recorded:.4f}"


def test_shipped_puppet_is_over_ten_times_smaller_than_its_twin_within_the_budget(shipped):
    """Stored numbers: parameters, batch-norm statistics and the learned router's weights."""
    twin = load_checkpoint(os.path.join(CHECKPOINTS, "static-twin-fmnist.safetensors"))
    assert twin.config.widths == shipped.config.widths and twin.config.max_depth == shipped.config.max_depth
    net = shipped.catalog.net
    stored = shipped.model.stored_numbers() + (DifficultyNet.from_dict(net).stored_numbers() if net else 0)
    assert stored <= 40_000
    assert twin.model.stored_numbers() / stored >= 10
    if net:
        assert DifficultyNet.from_dict(net).stored_numbers() <= 2_000
