"""The `puppet-cnn` command fails with a message, not a traceback."""

import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration  # each test runs the command in a process of its own


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    r = _run("evaluate", "--checkpoint", str(tmp_path / "none.safetensors"))
    assert r.returncode == 2
    assert "none.safetensors does not exist" in r.stderr and "Traceback" not in r.stderr


def test_missing_dataset_is_a_clear_error():
    r = _run("train", "--dataset", "cifar10", "--quiet")
    assert r.returncode == 2
    assert "needs --data-dir" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_the_commands():
    r = _run("--help")
    assert r.returncode == 0 and "train" in r.stdout and "evaluate" in r.stdout
