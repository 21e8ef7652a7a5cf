"""Datasets as in-memory uint8 tensors: Fashion-MNIST (Debian package), CIFAR-10/100, image folders.

Nothing here downloads: a missing dataset raises `DatasetError` saying how to install it or where to
put it. Images come back as uint8 (N, C, H, W) with int64 labels and the class names.
"""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message says what to do."""


@dataclass
class Dataset:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | slice) -> Dataset:
        return Dataset(self.images[index], self.labels[index], self.classes, self.name)


# -- Fashion-MNIST --------------------------------------------------------------------------------


def fashion_mnist_dir() -> Path:
    """Locate the directory of the Debian package's IDX files through dpkg, not by guessing."""
    if shutil.which("dpkg") is not None:
        result = subprocess.run(["dpkg", "-L", FASHION_MNIST_PACKAGE], capture_output=True, text=True, check=False)
        for line in result.stdout.splitlines():
            if line.endswith("train-images-idx3-ubyte.gz"):
                return Path(line).parent
    raise DatasetError(
        f"Fashion-MNIST not found: install the Debian package with `apt-get install {FASHION_MNIST_PACKAGE}` "
        "(or `make test`, which does it when run as root), or pass --data-dir with the four IDX .gz files"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), the MNIST family's format."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read IDX file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: expected {int(np.prod(shape))} bytes of data for shape {shape}, got {body.size}")
    return body.reshape(shape)


def load_fashion_mnist(split: str, data_dir: Path | None = None) -> Dataset:
    root = Path(data_dir) if data_dir else fashion_mnist_dir()
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path, labels_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (images_path, labels_path):
        if not p.exists():
            raise DatasetError(f"Fashion-MNIST file {p} is missing: `apt-get install {FASHION_MNIST_PACKAGE}`")
    images = torch.from_numpy(read_idx(images_path).copy()).unsqueeze(1)  # (N, 1, 28, 28)
    labels = torch.from_numpy(read_idx(labels_path).astype(np.int64))
    return Dataset(images, labels, FASHION_MNIST_CLASSES, "fashion-mnist")


# -- CIFAR (python pickle format) -----------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles of dicts of numpy arrays: allow exactly that, nothing else."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as e:
        raise DatasetError(f"CIFAR file {path} is missing") from e
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"{path}: not a CIFAR python batch ({e})") from e


def _key(d: dict, name: str):
    return d[name.encode()] if name.encode() in d else d[name]


def load_cifar(name: str, split: str, data_dir: Path) -> Dataset:
    """CIFAR-10 (`cifar-10-batches-py`) or CIFAR-100 (`cifar-100-python`) in their python format."""
    root = Path(data_dir)
    if name == "cifar10":
        sub = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        files = [sub / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [sub / "test_batch"]
        label_key, meta_file, names_key = "labels", sub / "batches.meta", "label_names"
    elif name == "cifar100":
        sub = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        files = [sub / ("train" if split == "train" else "test")]
        label_key, meta_file, names_key = "fine_labels", sub / "meta", "fine_label_names"
    else:
        raise DatasetError(f"unknown CIFAR variant {name!r}")
    if not sub.is_dir():
        raise DatasetError(f"{name}: directory {sub} does not exist; extract the python version of the dataset there")
    images, labels = [], []
    for f in files:
        batch = _read_cifar_pickle(f)
        images.append(np.asarray(_key(batch, "data"), dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(_key(batch, label_key), dtype=np.int64))
    meta = _read_cifar_pickle(meta_file)
    classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in _key(meta, names_key))
    return Dataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), classes, name)


# -- class-per-folder images -----------------------------------------------------------------------


def load_image_folder(root: Path, image_size: int, channels: int = 3) -> Dataset:
    """root/<class name>/<image files>, resized to image_size (mini-ImageNet or a user's own data)."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; expected one sub-folder of images per class")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise DatasetError(f"image folder {root} has no class sub-folders")
    mode = {1: "L", 3: "RGB"}[channels]
    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(path) as im:
                im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, channels)
            images.append(arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DatasetError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return Dataset(torch.from_numpy(np.stack(images)), torch.tensor(labels), classes, f"folder:{root.name}")


def load_dataset(name: str, split: str, data_dir: Path | None = None, image_size: int = 84) -> Dataset:
    """Load a dataset split ("train" or "test") by name: fashion-mnist, cifar10, cifar100, folder."""
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DatasetError(f"{name} needs --data-dir: the directory holding the extracted python version")
        return load_cifar(name, split, data_dir)
    if name == "folder":
        if data_dir is None:
            raise DatasetError("folder needs --data-dir with <split>/<class>/<image> sub-folders")
        return load_image_folder(Path(data_dir) / split, image_size)
    raise DatasetError(f"unknown dataset {name!r}; choose fashion-mnist, cifar10, cifar100 or folder")


def encode_png(image: torch.Tensor) -> bytes:
    """One uint8 (C, H, W) image as PNG bytes."""
    from PIL import Image

    arr = image.permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def split_train_val(data: Dataset, val_size: int, seed: int) -> tuple[Dataset, Dataset]:
    """A training and a validation set: `val_size` images drawn by `seed`, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data), generator=g)
    return data.subset(perm[val_size:]), data.subset(perm[:val_size])
