"""Fashion-MNIST (60k train / 10k test, 28x28 gray) from the official idx files, held in memory."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from skuvision.data.datamodule import ImageDataModule
from skuvision.data.datasets import InMemoryImages
from skuvision.errors import SkuvisionError
from skuvision.net import host_reachable

log = logging.getLogger(__name__)

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Where the Debian package dataset-fashion-mnist puts the files.
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DOWNLOAD_HOST = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally .gz): big-endian header of dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SkuvisionError(
            f"{path} is not a uint8 idx file; replace it with the official Fashion-MNIST file"
        )
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SkuvisionError(
            f"{path} is truncated ({body.size} of {int(np.prod(dims))} values); fetch it again"
        )
    return body.reshape(dims)


def find_file(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


class FashionMNISTDataModule(ImageDataModule):
    """Looks in data.root, its torchvision layout (FashionMNIST/raw) and the Debian package's folder."""

    in_chans = 1

    def __init__(self, root: str, input_config: dict, system_dirs: Sequence[str] = (DEBIAN_DIR,), **kwargs):
        super().__init__(root=root, input_config=input_config, **kwargs)
        self.system_dirs = [Path(d) for d in system_dirs]

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    def search_dirs(self) -> list[Path]:
        root = Path(self.root).expanduser()
        return [root, root / "FashionMNIST" / "raw", *self.system_dirs]

    def find_files(self) -> dict[str, Path | None]:
        return {key: find_file(self.search_dirs(), stem) for key, stem in FILES.items()}

    def fetch_missing(self) -> None:
        if all(self.find_files().values()) or not host_reachable(DOWNLOAD_HOST):
            return
        from torchvision.datasets import FashionMNIST

        log.info("downloading Fashion-MNIST into %s", self.root)
        FashionMNIST(self.root, train=True, download=True)

    def locate(self) -> dict[str, Path]:
        found = self.find_files()
        missing = [FILES[k] + ".gz" for k, p in found.items() if p is None]
        if missing:
            raise SkuvisionError(
                f"Fashion-MNIST files not found: {', '.join(missing)}. Looked in "
                f"{', '.join(str(d) for d in self.search_dirs())}. Fix: run `make data` (installs the Debian "
                f"package dataset-fashion-mnist), or copy the four .gz files into data.root={self.root}."
            )
        return found

    def load_splits(self) -> dict[str, InMemoryImages]:
        files = self.locate()
        log.info("Fashion-MNIST from %s", files["train_images"].parent)

        def images(key: str) -> torch.Tensor:
            return torch.from_numpy(read_idx(files[key]).copy()).unsqueeze(1)

        def labels(key: str) -> torch.Tensor:
            return torch.from_numpy(read_idx(files[key]).astype(np.int64))

        full = InMemoryImages(images("train_images"), labels("train_labels"))
        train_idx, val_idx = self.split_train_val(full.labels.tolist())
        return {
            "train": full.subset(train_idx),
            "val": full.subset(val_idx),
            "test": InMemoryImages(images("test_images"), labels("test_labels")),
        }
