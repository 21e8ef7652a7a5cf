"""Regression guard for the shipped model: its recorded figures still hold on this code."""

import json
import os

import pytest
import torch

from conftest import REPO
from model import complexity, load_checkpoint, load_dataset
from model.evaluate import REGRESSION_SLICE

CHECKPOINTS = os.path.join(REPO, "checkpoints")
REPORT = os.path.join(REPO, "docs", "model-report.json")


@pytest.fixture(scope="module")
def report():
    with open(REPORT) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(os.path.join(CHECKPOINTS, "puppet-cnn-fmnist.safetensors"))


def test_report_describes_the_shipped_checkpoint(report, shipped):
    assert report["sha256"] == shipped.sha256, (
        "docs/model-report.json was written for another checkpoint: re-run make evaluate"
    )
    assert report["version"] == shipped.version


def test_accuracy_on_a_fixed_test_slice_matches_the_recorded_figure(report, shipped):
    test = load_dataset("fashion-mnist", "test").subset(slice(0, REGRESSION_SLICE))
    depths = shipped.policy.auto(complexity(test.images))
    with torch.no_grad():
        shipped.model.cache_kernels()
        logits = shipped.model(shipped.preprocessing.normalise(test.images), depths)
    accuracy = float((logits.argmax(-1) == test.labels).float().mean())
    recorded = report["regression_slice"]["accuracy_policy"]
    assert report["regression_slice"]["images"] == REGRESSION_SLICE
    assert abs(accuracy - recorded) <= 0.005, f"accuracy {accuracy:.4f} against recorded {recorded:.4f}"


def test_shipped_puppet_is_over_ten_times_smaller_than_its_twin(shipped):
    twin = load_checkpoint(os.path.join(CHECKPOINTS, "static-twin-fmnist.safetensors"))
    assert twin.config.widths == shipped.config.widths and twin.config.max_depth == shipped.config.max_depth
    assert twin.model.stored_parameters() / shipped.model.stored_parameters() >= 10
