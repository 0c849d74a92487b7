"""Image files as a dataset: each file decoded (at reduced JPEG scale, upright, within the pixel budget) into
the model's uint8 input, read from the decoded-image cache, or, with `decode_on=gpu`, handed over as JPEG
bytes (with their EXIF orientation) for the device to decode.

Every file-based source (image folders, prediction inputs, manifests) builds on `ImageFiles`, so each gets
the same decoding, cache and device path.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import ExifTags, Image
from torch.utils.data import Dataset, default_collate
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from skuvision.data.images import open_rgb

log = logging.getLogger(__name__)

DECODE_ON = ("cpu", "gpu")


class ImageFiles(Dataset):
    """Files at `paths`. The data module sets, per split: `transform` (PIL image -> uint8 CHW tensor),
    `min_side` (the shorter side that transform needs, for reduced-scale JPEG decoding; None decodes in
    full), `interpolation` (for the eval transform: see images.open_rgb), `max_pixels` (the pixel budget: a
    file that would decode to more is refused, see images.pixel_budget; None: no budget), `cached` (a
    CachedImages holding this split's images already transformed) and `jpeg_bytes` (True: JPEGs come out as
    JpegFile, their raw bytes, for `decode_batch_on_device`)."""

    channels = 3

    def __init__(self, paths: list[Path], transform=None):
        self.paths = paths
        self.transform = transform
        self.min_side: int | None = None
        self.interpolation: str | None = None
        self.max_pixels: int | None = None
        self.cached = None
        self.jpeg_bytes = False

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> torch.Tensor:
        """The file decoded and transformed, ignoring the cache; raises DECODE_ERRORS."""
        img = open_rgb(self.paths[index], self.min_side, self.interpolation, self.max_pixels)
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
            data = read_file(str(self.paths[index]))
            orientation = device_orientation(data, self.max_pixels)
            if orientation is not None:
                return JpegFile(data, orientation)
        return self.decode(index)


class JpegFile(NamedTuple):
    """A JPEG file's bytes (1-D uint8) and its EXIF orientation (1-8), for the device decoder."""

    data: torch.Tensor
    orientation: int


def device_orientation(data: torch.Tensor, max_pixels: int | None = None) -> int | None:
    """The EXIF orientation (1: as stored) of JPEG bytes the device decoder takes, or None for those it does
    not: CMYK and other formats, and JPEGs whose full size is over `max_pixels` (the device decodes in full;
    the CPU path decodes them at reduced scale, within the budget, or refuses them)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:  # reads the header only
        if img.mode not in ("RGB", "L"):
            return None
        if max_pixels is not None and img.width * img.height > max_pixels:
            return None
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in ORIENTATIONS else 1


# EXIF orientation -> (swap height and width, then flip these dims) of a (C, H, W) tensor: the transposes
# ImageOps.exif_transpose makes (2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE,
# 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90). torchvision's decode_jpeg applies the tag on the CPU only, so the
# device path turns its images itself; tests check this table against both libraries.
ORIENTATIONS = {
    1: (False, ()),
    2: (False, (-1,)),
    3: (False, (-2, -1)),
    4: (False, (-2,)),
    5: (True, ()),
    6: (True, (-1,)),
    7: (True, (-2, -1)),
    8: (True, (-2,)),
}


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as stored in its JPEG -> as its EXIF orientation says it is seen, on its device."""
    swap, flips = ORIENTATIONS[orientation]
    if swap:
        image = image.transpose(-2, -1)
    return image.flip(flips) if flips else image


class JpegBatch(NamedTuple):
    """Images of a batch as they leave the DataLoader workers with `decode_on=gpu`: the JPEG files packed end
    to end in one uint8 tensor, so a batch crosses from a worker in one shared-memory handle rather than one
    per image (hundreds per batch exhaust the open-file limit); images the device decoder does not take
    arrive decoded, at the model's size."""

    data: torch.Tensor  # uint8: the JPEG files, end to end
    lengths: torch.Tensor  # int64: bytes of each JPEG
    orientations: torch.Tensor  # int64: EXIF orientation of each JPEG
    jpeg_positions: torch.Tensor  # int64: where each JPEG sits in the batch
    decoded: torch.Tensor  # uint8 NxCxHxW (N may be 0): the other images
    decoded_positions: torch.Tensor  # int64

    @property
    def num_images(self) -> int:
        return len(self.jpeg_positions) + len(self.decoded_positions)


def collate_images(batch: list[tuple]) -> tuple:
    """Like default_collate, but a batch holding JpegFiles becomes a JpegBatch."""
    images, *rest = zip(*batch, strict=True)
    rest = [default_collate(list(r)) for r in rest]
    jpegs = [i for i, img in enumerate(images) if isinstance(img, JpegFile)]
    if not jpegs:
        return (torch.stack(images), *rest)
    others = [i for i, img in enumerate(images) if not isinstance(img, JpegFile)]
    packed = JpegBatch(
        data=torch.cat([images[i].data for i in jpegs]),
        lengths=torch.tensor([len(images[i].data) for i in jpegs], dtype=torch.int64),
        orientations=torch.tensor([images[i].orientation for i in jpegs], dtype=torch.int64),
        jpeg_positions=torch.tensor(jpegs, dtype=torch.int64),
        decoded=torch.stack([images[i] for i in others]) if others else torch.empty(0, dtype=torch.uint8),
        decoded_positions=torch.tensor(others, dtype=torch.int64),
    )
    return (packed, *rest)


def decode_batch_on_device(images: JpegBatch, device: torch.device, resize_crop, channels: int = 3):
    """A JpegBatch -> a uint8 batch at the model's size on `device`. The JPEGs are decoded together (nvJPEG
    on CUDA), then each is resized and center-cropped on the device by `resize_crop`
    (ToModelInput.resize_crop: the eval geometry), after being turned upright by its EXIF orientation. A
    batch the device decoder refuses is decoded on the CPU instead."""
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
        positions, orientations = images.jpeg_positions.tolist(), images.orientations.tolist()
        for position, img, orientation in zip(positions, decoded, orientations, strict=True):
            out[position] = resize_crop(upright(img, orientation).unsqueeze(0))[0]
    return torch.stack(out)
