"""Dataset loaders: Fashion-MNIST from the Debian package, CIFAR pickles, image folders, clear errors."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import FASHION_MNIST_CLASSES, DatasetError, load_dataset, read_idx


def _write_cifar10(root, n_per_batch=4):
    sub = root / "cifar-10-batches-py"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(sub / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": []}, f)
        expected.append((data, labels))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(sub / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return expected


def test_cifar10_python_batches(tmp_path):
    expected = _write_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", tmp_path)
    test = load_dataset("cifar10", "test", tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (4, 3, 32, 32)
    # row-major 3072 = 3 x 32 x 32, channel first: the red plane is the first 1024 bytes
    np.testing.assert_array_equal(train.images[0, 0].numpy().ravel(), expected[0][0][0, :1024])
    np.testing.assert_array_equal(train.images[0, 2].numpy().ravel(), expected[0][0][0, 2048:])
    assert train.labels.tolist() == [lab for _, labels in expected[:5] for lab in labels]
    assert train.classes[0] == "airplane" and len(train.classes) == 10


def test_cifar100_python_files(tmp_path):
    sub = tmp_path / "cifar-100-python"
    sub.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("test", 3)):
        with open(sub / split, "wb") as f:
            pickle.dump(
                {
                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    b"fine_labels": list(range(n)),
                    b"coarse_labels": [0] * n,
                },
                f,
            )
    with open(sub / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []}, f)
    train = load_dataset("cifar100", "train", tmp_path)
    assert train.images.shape == (6, 3, 32, 32) and train.labels.tolist() == list(range(6))
    assert len(train.classes) == 100 and train.classes[5] == "c5"


def test_cifar_loader_refuses_pickles_that_run_code(tmp_path):
    _write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        load_dataset("cifar10", "test", tmp_path)


def test_image_folder(tmp_path):
    for cls, value in (("cats", 10), ("dogs", 200)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (value, value, value)).save(tmp_path / "train" / cls / f"{i}.png")
    (tmp_path / "train" / "dogs" / "notes.txt").write_text("not an image")
    data = load_dataset("folder", "train", tmp_path, image_size=16)
    assert data.classes == ("cats", "dogs")
    assert data.images.shape == (4, 3, 16, 16)
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert int(data.images[0].float().mean()) == 10 and int(data.images[3].float().mean()) == 200


def test_missing_datasets_say_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="needs --data-dir"):
        load_dataset("cifar10", "train")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("cifar10", "train", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet", "train")


def test_idx_reader_checks_sizes(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 3) + bytes(range(18)))
    assert read_idx(path).shape == (2, 3, 3)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 3) + bytes(range(17)))
    with pytest.raises(DatasetError, match="expected 18 bytes"):
        read_idx(path)


def test_fashion_mnist_from_the_debian_package():
    test = load_dataset("fashion-mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert test.classes == FASHION_MNIST_CLASSES
    assert torch.bincount(test.labels).tolist() == [1000] * 10
