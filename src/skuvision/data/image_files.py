"""Image files as a dataset: each file decoded (at reduced JPEG scale) into the model's uint8 input, read from
the decoded-image cache, or, with `decode_on=gpu`, handed over as JPEG bytes for the device to decode.

Every file-based source (image folders, prediction inputs, manifests) builds on `ImageFiles`, so each gets
the same decoding, cache and device path.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from skuvision.data.images import open_rgb

log = logging.getLogger(__name__)

DECODE_ON = ("cpu", "gpu")


class ImageFiles(Dataset):
    """Files at `paths`. The data module sets, per split: `transform` (PIL image -> uint8 CHW tensor),
    `min_side` (the shorter side that transform needs, for reduced-scale JPEG decoding; None decodes in
    full), `interpolation` (for the eval transform: see images.open_rgb), `cached` (a CachedImages holding
    this split's images already transformed) and `jpeg_bytes` (True: JPEGs come out as their raw bytes, for
    `decode_batch_on_device`)."""

    channels = 3

    def __init__(self, paths: list[Path], transform=None):
        self.paths = paths
        self.transform = transform
        self.min_side: int | None = None
        self.interpolation: str | None = None
        self.cached = None
        self.jpeg_bytes = False

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> torch.Tensor:
        """The file decoded and transformed, ignoring the cache; raises DECODE_ERRORS."""
        img = open_rgb(self.paths[index], self.min_side, self.interpolation)
        if self.channels == 1:
            img = img.convert("L")
        return self.transform(img)

    def image(self, index: int) -> torch.Tensor:
        """uint8 CHW at the transform's output size, or (jpeg_bytes) a 1-D uint8 tensor of JPEG bytes."""
        if self.cached is not None:
            hit = self.cached.get(index)
            if hit is not None:
                return hit
        if self.jpeg_bytes:
            data = read_file(str(self.paths[index]))
            if device_decodable(data):
                return data
        return self.decode(index)


def device_decodable(data: torch.Tensor) -> bool:
    """Whether JPEG bytes are of a kind the device decoder takes (baseline/progressive RGB or gray; CMYK and
    other formats are decoded on the CPU instead)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:  # reads the header only
        return img.mode in ("RGB", "L")


class JpegBatch(NamedTuple):
    """Images of a batch as they leave the DataLoader workers with `decode_on=gpu`: the JPEG files packed end
    to end in one uint8 tensor, so a batch crosses from a worker in one shared-memory handle rather than one
    per image (hundreds per batch exhaust the open-file limit); images the device decoder does not take
    arrive decoded, at the model's size."""

    data: torch.Tensor  # uint8: the JPEG files, end to end
    lengths: torch.Tensor  # int64: bytes of each JPEG
    jpeg_positions: torch.Tensor  # int64: where each JPEG sits in the batch
    decoded: torch.Tensor  # uint8 NxCxHxW (N may be 0): the other images
    decoded_positions: torch.Tensor  # int64

    @property
    def num_images(self) -> int:
        return len(self.jpeg_positions) + len(self.decoded_positions)


def collate_images(batch: list[tuple]) -> tuple:
    """Like default_collate, but a batch holding JPEG bytes (1-D tensors) becomes a JpegBatch."""
    images, *rest = zip(*batch, strict=True)
    rest = [default_collate(list(r)) for r in rest]
    if all(img.ndim == 3 for img in images):
        return (torch.stack(images), *rest)
    jpegs = [i for i, img in enumerate(images) if img.ndim == 1]
    others = [i for i, img in enumerate(images) if img.ndim != 1]
    packed = JpegBatch(
        data=torch.cat([images[i] for i in jpegs]),
        lengths=torch.tensor([len(images[i]) for i in jpegs], dtype=torch.int64),
        jpeg_positions=torch.tensor(jpegs, dtype=torch.int64),
        decoded=torch.stack([images[i] for i in others]) if others else torch.empty(0, dtype=torch.uint8),
        decoded_positions=torch.tensor(others, dtype=torch.int64),
    )
    return (packed, *rest)


def decode_batch_on_device(images: JpegBatch, device: torch.device, resize_crop, channels: int = 3):
    """A JpegBatch -> a uint8 batch at the model's size on `device`. The JPEGs are decoded together (nvJPEG
    on CUDA), then each is resized and center-cropped on the device by `resize_crop`
    (ToModelInput.resize_crop: the eval geometry). A batch the device decoder refuses is decoded on the CPU
    instead."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out: list[torch.Tensor | None] = [None] * images.num_images
    for position, img in zip(images.decoded_positions.tolist(), images.decoded, strict=True):
        out[position] = img.to(device, non_blocking=True)
    data = list(
        images.data.split(images.lengths.tolist())
    )  # views; decode_jpeg takes CPU bytes for any device
    if data:
        try:
            decoded = decode_jpeg(data, mode=mode, device=device)
        except RuntimeError as err:
            log.warning("device JPEG decoding failed for a batch (%s); decoding it on the CPU", err)
            decoded = [decode_jpeg(d, mode=mode).to(device) for d in data]
        for position, img in zip(images.jpeg_positions.tolist(), decoded, strict=True):
            out[position] = resize_crop(img.unsqueeze(0))[0]
    return torch.stack(out)
