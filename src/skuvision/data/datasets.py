"""Every dataset of the package: images held in memory, and image files decoded one by one.

Each yields (uint8 CHW tensor, label), or (tensor, error) for prediction inputs. What a split is made of is
read through `dataset_labels` and `dataset_paths`, which know how each kind (and a Subset of it) stores it.

Every file-based source (image folders, manifests, prediction inputs) builds on `ImageFiles`, so each gets the
same decoding (skuvision.data.decode), decoded-image cache and device path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms.v2.functional import to_pil_image

from skuvision.data.decode import DECODE_ERRORS, JpegFile, device_jpeg, open_rgb
from skuvision.data.transforms import crop_mode, eval_image_transform, eval_min_side, eval_pixel_budget
from skuvision.errors import SkuvisionError


class InMemoryImages(Dataset):
    """uint8 images (N, C, H, W) and int64 labels held in memory; fetched a whole batch at a time.

    With a per-image `transform` (a PIL training augmentation), images go through it one by one instead.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels.long()
        self.transform = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]):
        # The DataLoader hands the whole batch's indices here: one gather instead of B tiny copies.
        index = torch.as_tensor(indices)
        if self.transform is None:
            return self.images[index], self.labels[index]
        return torch.stack([self._transformed(i) for i in indices]), self.labels[index]

    def _transformed(self, i: int) -> torch.Tensor:
        image = self.images[i]
        channels = image.shape[0]
        out = self.transform(to_pil_image(image).convert("RGB"))
        return out[:channels] if channels == 1 else out  # gray stays gray: every op treats R, G, B alike

    def subset(self, indices: np.ndarray) -> InMemoryImages:
        index = torch.as_tensor(indices)
        return InMemoryImages(self.images[index], self.labels[index])


def keep_batch(batch):
    """collate_fn for InMemoryImages: __getitems__ already returns the stacked batch."""
    return batch


class ImageFiles(Dataset):
    """Files at `paths`. The data module sets, per split: `transform` (PIL image -> uint8 CHW tensor),
    `min_side` (the shorter side that transform needs, for reduced-scale JPEG decoding; None decodes in
    full), `interpolation` and `crop_mode` (for the eval transform: see decode.open_rgb), `max_pixels` (the
    pixel budget: a file that would decode to more is refused, see decode.pixel_budget; None: no budget),
    `cached` (a CachedImages holding this split's images already transformed) and `jpeg_bytes` (True: JPEGs
    come out as JpegFile, their raw bytes, for `decode.decode_batch_on_device`)."""

    channels = 3

    def __init__(self, paths: list[Path], transform=None):
        self.paths = paths
        self.transform = transform
        self.min_side: int | None = None
        self.interpolation: str | None = None
        self.crop_mode = "center"
        self.max_pixels: int | None = None
        self.cached = None
        self.jpeg_bytes = False

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> torch.Tensor:
        """The file decoded and transformed, ignoring the cache; raises DECODE_ERRORS."""
        img = open_rgb(self.paths[index], self.min_side, self.interpolation, self.max_pixels, self.crop_mode)
        if self.channels == 1:
            img = img.convert("L")
        return self.transform(img)

    def image(self, index: int) -> torch.Tensor | JpegFile:
        """uint8 CHW at the transform's output size, or (jpeg_bytes) the file's JPEG bytes as a JpegFile."""
        if self.cached is not None:
            hit = self.cached.get(index)
            if hit is not None:
                return hit
        if self.jpeg_bytes:
            jpeg = device_jpeg(self.paths[index], self.max_pixels)
            if jpeg is not None:
                return jpeg
        return self.decode(index)


class LabelledImageFiles(ImageFiles):
    """(path, label) pairs decoded into the model's uint8 input (see ImageFiles): the split of an image
    folder or a manifest. `samples` and `targets` hold the pairs and the labels."""

    def __init__(self, samples: list[tuple[Path, int]], transform=None):
        super().__init__([path for path, _ in samples], transform)
        self.samples = samples
        self.targets = [label for _, label in samples]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            return self.image(index), label
        except DECODE_ERRORS as err:  # changed since the setup scan
            raise SkuvisionError(f"cannot read image {path}: {err}; remove or replace the file") from err


class TableImageFiles(LabelledImageFiles):
    """A split of a table with several label or tag columns: yields (image, {column: target}), a label
    column's class index (-1 where the row has no value) and a tag column's multi-hot float vector.
    `targets` holds the first label column's indices (what stratified splits, subsets and sampling use)."""

    def __init__(self, samples: list[tuple[Path, int]], row_targets: list[dict], transform=None):
        super().__init__(samples, transform)
        self.row_targets = row_targets

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, _ = super().__getitem__(index)
        return image, self.row_targets[index]


class InputImageFiles(ImageFiles):
    """Unlabelled files to predict or embed: (uint8 CHW tensor at the model's size, error message or "")
    per path, so that one bad file (or one over the model's pixel budget) becomes an error row instead of
    stopping the run."""

    def __init__(self, paths: list[Path], input_config: dict):
        super().__init__(paths, eval_image_transform(input_config))
        self.input_config = input_config
        self.channels = int(input_config["input_size"][0])
        self.min_side = eval_min_side(input_config)
        self.interpolation = input_config["interpolation"]
        self.crop_mode = crop_mode(input_config)
        self.max_pixels = eval_pixel_budget(input_config)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        channels, size, _ = self.input_config["input_size"]
        try:
            return self.image(index), ""
        except DECODE_ERRORS as err:
            error = broken_link(self.paths[index]) or f"{type(err).__name__}: {err}"
            return torch.zeros(channels, size, size, dtype=torch.uint8), error[:200]


def broken_link(path) -> str | None:
    """What is wrong with a symbolic link that leads to no file (dangling, or a loop); None otherwise."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as err:
        return f"symbolic link to {os.readlink(path)}: {err.strerror}"
    return None


def dataset_labels(dataset: Dataset) -> list[int]:
    """Labels of a dataset without decoding images."""
    if isinstance(dataset, InMemoryImages):
        return dataset.labels.tolist()
    if isinstance(dataset, Subset):
        parent = dataset_labels(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    return list(dataset.targets)


def dataset_paths(dataset: Dataset) -> list[str] | None:
    """File paths of a file-backed dataset, in order; None for images that are not files of their own
    (in-memory sets, shard streams)."""
    if isinstance(dataset, Subset):
        parent = dataset_paths(dataset.dataset)
        return [parent[i] for i in dataset.indices] if parent else None
    if isinstance(dataset, LabelledImageFiles):
        return [str(path) for path, _ in dataset.samples] or None
    return None
