"""Checkpoint round trip and clear errors for missing, truncated, corrupt or mismatched files."""

import json
import struct

import pytest
import torch

from model import Checkpoint, CheckpointError, DepthPolicy, Preprocessing, StaticTwin, load_checkpoint, save_checkpoint


@pytest.fixture
def ckpt(small_puppet, small_config):
    return Checkpoint(
        model=small_puppet,
        kind="puppet",
        classes=tuple(f"class-{i}" for i in range(small_config.num_classes)),
        preprocessing=Preprocessing(12, 1, (0.25,), (0.5,)),
        policy=DepthPolicy((4.0, 5.0), (1, 3, 2), 3, 0.004),
        version="test-1",
        dataset="synthetic",
        recipe={"epochs": 1},
        metrics={"validation": {"accuracy": 0.5}},
    )


def test_round_trip_gives_identical_logits_and_metadata(ckpt, tmp_path, small_config):
    path = save_checkpoint(ckpt, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        for d in (1, 2, 3):
            torch.testing.assert_close(loaded.model(x, d), ckpt.model(x, d), rtol=0, atol=0)
    assert loaded.config == small_config
    assert loaded.classes == ckpt.classes
    assert loaded.policy == ckpt.policy
    assert loaded.preprocessing == ckpt.preprocessing
    assert loaded.version == "test-1" and loaded.recipe == {"epochs": 1}
    assert len(loaded.sha256) == 64 and loaded.sha256 == ckpt.sha256


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file_is_refused(ckpt, tmp_path):
    path = save_checkpoint(ckpt, tmp_path / "m.safetensors")
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 7):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 64 + b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_checkpoint(path)


def _rewrite_metadata(path, edit):
    """Edit the JSON metadata inside a safetensors header, keeping the file well-formed."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["puppet_cnn"])
    edit(meta)
    header["__metadata__"]["puppet_cnn"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_architecture_mismatch_is_refused(ckpt, tmp_path):
    path = save_checkpoint(ckpt, tmp_path / "m.safetensors")

    def widen(meta):
        meta["architecture"]["widths"] = [4, 16]

    _rewrite_metadata(path, widen)
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(path)


def test_kind_mismatch_is_refused(ckpt, tmp_path):
    path = save_checkpoint(ckpt, tmp_path / "m.safetensors")
    _rewrite_metadata(path, lambda meta: meta.update(kind="twin"))
    with pytest.raises(CheckpointError, match="does not match its architecture"):
        load_checkpoint(path)


def test_wrong_class_count_is_refused(ckpt, tmp_path):
    path = save_checkpoint(ckpt, tmp_path / "m.safetensors")
    _rewrite_metadata(path, lambda meta: meta.update(classes=["a", "b"]))
    with pytest.raises(CheckpointError, match="2 classes for a 5-class head"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_refused(tmp_path, small_config):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in StaticTwin(small_config).state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="no puppet-cnn metadata"):
        load_checkpoint(path)


def test_loading_never_unpickles(ckpt, tmp_path, monkeypatch):
    import pickle

    path = save_checkpoint(ckpt, tmp_path / "m.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("load_checkpoint must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_checkpoint(path)
