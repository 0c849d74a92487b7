"""CIFAR-10 and CIFAR-100 from the official python-pickle batches, held in memory."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch

from skuvision.data.datamodule import ImageDataModule
from skuvision.data.datasets import InMemoryImages
from skuvision.errors import SkuvisionError
from skuvision.net import host_reachable

log = logging.getLogger(__name__)

DOWNLOAD_HOST = "www.cs.toronto.edu"
# The classes in the order of the official meta files (checked against them when the data is read).
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
    "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip


def read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise SkuvisionError(f"{path} is not a readable CIFAR pickle batch ({err}); fetch it again") from err


def batch_arrays(batch: dict, label_key: bytes, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, ValueError) as err:
        raise SkuvisionError(f"{path} lacks CIFAR fields b'data'/{label_key!r} of the right shape") from err
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


class CIFARDataModule(ImageDataModule):
    """Shared by CIFAR-10 and CIFAR-100; the subclasses name the folder, files and label field."""

    folder: str
    train_files: list[str]
    test_files: list[str]
    meta_file: str
    label_key: bytes
    names_key: bytes
    known_class_names: list[str]
    torchvision_class: str

    @property
    def data_dir(self) -> Path:
        return Path(self.root).expanduser() / self.folder

    def missing_files(self) -> list[str]:
        needed = [*self.train_files, *self.test_files, self.meta_file]
        return [f for f in needed if not (self.data_dir / f).is_file()]

    def fetch_missing(self) -> None:
        if not self.missing_files() or not host_reachable(DOWNLOAD_HOST):
            return
        import torchvision.datasets

        log.info("downloading %s into %s", self.torchvision_class, self.root)
        getattr(torchvision.datasets, self.torchvision_class)(self.root, download=True)

    def _require(self) -> None:
        missing = self.missing_files()
        if missing:
            raise SkuvisionError(
                f"{self.torchvision_class} files not found in {self.data_dir}: {', '.join(missing)}. "
                f"Fix: unpack the official python version archive into data.root={self.root} (it creates "
                f"{self.folder}/), or run with network access so it downloads (data.download=true)."
            )

    @property
    def class_names(self) -> list[str]:
        return list(self.known_class_names)

    def check_class_names(self) -> None:
        """The meta file must name the classes this source assumes, in the same order."""
        meta_path = self.data_dir / self.meta_file
        names = [n.decode() for n in read_batch(meta_path).get(self.names_key, [])]
        if names != self.known_class_names:
            raise SkuvisionError(
                f"{meta_path} names other classes than {self.torchvision_class}'s; "
                "replace the folder with the official python version archive"
            )

    def _read(self, files: list[str]) -> InMemoryImages:
        parts = [
            batch_arrays(read_batch(self.data_dir / f), self.label_key, self.data_dir / f) for f in files
        ]
        return InMemoryImages(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def load_splits(self) -> dict[str, InMemoryImages]:
        self._require()
        self.check_class_names()
        full = self._read(self.train_files)
        train_idx, val_idx = self.split_train_val(full.labels.tolist())
        return {
            "train": full.subset(train_idx),
            "val": full.subset(val_idx),
            "test": self._read(self.test_files),
        }


class CIFAR10DataModule(CIFARDataModule):
    folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    meta_file = "batches.meta"
    label_key = b"labels"
    names_key = b"label_names"
    known_class_names = CIFAR10_CLASSES
    torchvision_class = "CIFAR10"


class CIFAR100DataModule(CIFARDataModule):
    folder = "cifar-100-python"
    train_files = ["train"]
    test_files = ["test"]
    meta_file = "meta"
    label_key = b"fine_labels"
    names_key = b"fine_label_names"
    known_class_names = CIFAR100_CLASSES
    torchvision_class = "CIFAR100"
