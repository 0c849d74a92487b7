"""From a decoded image to the model's input: timm's per-image eval transform, and the batched
uint8 -> normalized float step that every data path ends in.

Datasets yield uint8 CHW tensors. Resizing (in-memory sets only), scaling and normalization run on whole
batches after they reach the device, so per-image CPU work stays minimal and the host->device copy is uint8.
"""

from __future__ import annotations

import math

import torch
from timm.data import create_transform, str_to_interp_mode
from torch import nn
from torchvision.transforms.v2 import functional as TF

from skuvision.data.decode import pixel_budget


def eval_image_transform(input_config: dict):
    """timm's deterministic eval transform ending in a uint8 tensor (normalization happens on the batch)."""
    return create_transform(
        input_size=tuple(input_config["input_size"]),
        interpolation=input_config["interpolation"],
        crop_pct=input_config["crop_pct"],
        is_training=False,
        use_prefetcher=True,
    )


def scale_size(image_size: int, crop_pct: float) -> int:
    """The resize target before the center crop, as timm computes it."""
    return math.floor(image_size / crop_pct)


def eval_min_side(input_config: dict) -> int:
    """The shorter side timm's eval transform resizes every image to: what a file must be decoded to."""
    return scale_size(int(input_config["input_size"][-1]), input_config["crop_pct"])


def eval_pixel_budget(input_config: dict) -> int:
    """The most pixels one file may decode to for this model (images.pixel_budget of its eval resize)."""
    return pixel_budget(eval_min_side(input_config))


class ToModelInput(nn.Module):
    """uint8 batch (B, C, h, w) -> float batch at the model's size, scaled to [0, 1] and normalized.

    A batch that already has the model's size (the PIL path) is only scaled and normalized. A batch of
    another size (in-memory sets) is resized and center-cropped the way timm's eval transform does it, in
    uint8 like PIL (torchvision's fast uint8 kernels), before the float conversion.
    """

    def __init__(self, input_config: dict):
        super().__init__()
        self.image_size = int(input_config["input_size"][-1])
        self.scale_size = scale_size(self.image_size, input_config["crop_pct"])
        self.interpolation = str_to_interp_mode(input_config["interpolation"])
        mean = torch.tensor(input_config["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(input_config["std"]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def resize_crop(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 at the model's size (unchanged if it has it already)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = TF.resize(images, self.scale_size, interpolation=self.interpolation, antialias=True)
            images = TF.center_crop(images, [self.image_size, self.image_size])
        return images

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [0, 1] at the model's size."""
        return self.resize_crop(images).float().div_(255)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """In place: `x` is the fresh tensor to_unit made."""
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.to_unit(images))
