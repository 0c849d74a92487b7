"""Image files as a dataset: each file decoded (at reduced JPEG scale) into the model's uint8 input, read from
the decoded-image cache, or, with `decode_on=gpu`, handed over as JPEG bytes for the device to decode.

Every file-based source (image folders, prediction inputs, manifests) builds on `ImageFiles`, so each gets
the same decoding, cache and device path.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

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


def collate_images(batch: list[tuple]) -> tuple:
    """Like default_collate, but images stay a list when some are JPEG bytes (of different lengths)."""
    images, *rest = zip(*batch, strict=True)
    if all(img.ndim == 3 for img in images):
        return (torch.stack(images), *(default_collate(list(r)) for r in rest))
    return (list(images), *(default_collate(list(r)) for r in rest))


def decode_batch_on_device(images: list[torch.Tensor], device: torch.device, resize_crop, channels: int = 3):
    """A list of JPEG bytes (1-D) and decoded uint8 CHW images -> a uint8 batch at the model's size on
    `device`. JPEGs are decoded together (nvJPEG on CUDA), then each is resized and center-cropped on the
    device by `resize_crop` (ToModelInput.resize_crop: the eval geometry). A JPEG the device decoder refuses
    is decoded on the CPU instead."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    jpegs = [i for i, img in enumerate(images) if img.ndim == 1]
    out = [img.to(device, non_blocking=True) if img.ndim == 3 else None for img in images]
    if jpegs:
        data = [images[i] for i in jpegs]  # decode_jpeg takes the bytes on the CPU for every device
        try:
            decoded = decode_jpeg(data, mode=mode, device=device)
        except RuntimeError as err:
            log.warning("device JPEG decoding failed for a batch (%s); decoding it on the CPU", err)
            decoded = [decode_jpeg(d, mode=mode).to(device) for d in data]
        for i, img in zip(jpegs, decoded, strict=True):
            out[i] = resize_crop(img.unsqueeze(0))[0]
    return torch.stack(out)
