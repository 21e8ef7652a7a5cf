"""Puppet-CNN: a CNN whose kernels come from a neural ODE and whose depth follows input complexity.

This package knows nothing of HTTP, FastAPI or Prometheus. Its public names:
"""

from model.checkpoint import (
    SHIPPED_CHECKPOINT,
    Checkpoint,
    CheckpointError,
    Preprocessing,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from model.complexity import complexity
from model.data import Dataset, DatasetError, load_dataset
from model.depth_policy import AUTO, CAPPED, DEGRADED, REQUESTED, DepthPolicy, calibrate
from model.device import resolve_device
from model.puppet import PuppetCNN, PuppetConfig, StaticTwin, build_model
from model.puppeteer import StagePuppeteer

__all__ = [
    "AUTO",
    "CAPPED",
    "DEGRADED",
    "REQUESTED",
    "SHIPPED_CHECKPOINT",
    "Checkpoint",
    "CheckpointError",
    "Dataset",
    "DatasetError",
    "DepthPolicy",
    "Preprocessing",
    "PuppetCNN",
    "PuppetConfig",
    "StagePuppeteer",
    "StaticTwin",
    "build_model",
    "calibrate",
    "complexity",
    "load_checkpoint",
    "load_dataset",
    "read_metadata",
    "resolve_device",
    "save_checkpoint",
]
