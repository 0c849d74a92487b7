"""From a decoded image to the model's input: timm's per-image eval transform, and the batched
uint8 -> normalized float step that every data path ends in.

Datasets yield uint8 CHW tensors. Resizing (in-memory sets only), scaling and normalization run on whole
batches after they reach the device, so per-image CPU work stays minimal and the host->device copy is uint8.
"""

from __future__ import annotations

import math

import torch
from timm.data import create_transform, str_to_interp_mode
from timm.data.transforms import ResizeKeepRatio, center_crop_or_pad
from torch import nn
from torchvision.transforms.v2 import functional as TF

from skuvision.data.decode import pixel_budget
from skuvision.errors import SkuvisionError

# timm's eval crop modes (transforms_imagenet_eval): center crops the middle square, squash resizes the whole
# image to the square, border fits the whole image inside it and pads.
CROP_MODES = ("center", "squash", "border")


def check_crop_mode(mode: str) -> str:
    if mode not in CROP_MODES:
        raise SkuvisionError(f"input.crop_mode={mode!r}: use one of {', '.join(CROP_MODES)}")
    return mode


def crop_mode(input_config: dict) -> str:
    """The config's crop mode: "center" for one stored before crop_mode existed (they all cropped so)."""
    return check_crop_mode(input_config.get("crop_mode") or "center")


def eval_image_transform(input_config: dict):
    """timm's deterministic eval transform ending in a uint8 tensor (normalization happens on the batch)."""
    return create_transform(
        input_size=tuple(input_config["input_size"]),
        interpolation=input_config["interpolation"],
        crop_pct=input_config["crop_pct"],
        crop_mode=crop_mode(input_config),
        mean=tuple(input_config["mean"]),  # crop_mode=border pads with it
        std=tuple(input_config["std"]),
        is_training=False,
        use_prefetcher=True,
    )


def scale_size(image_size: int, crop_pct: float) -> int:
    """The resize target before the center crop, as timm computes it."""
    return math.floor(image_size / crop_pct)


def border_fill(input_config: dict) -> list[int]:
    """The uint8 value per channel crop_mode=border pads with: the mean, as timm's eval transform pads."""
    return [round(255 * m) for m in input_config["mean"]]


def eval_min_side(input_config: dict) -> int:
    """The shorter side a file must be decoded to so that timm's eval transform never upsamples it: S, the
    side it resizes to. center and squash resize the shorter side to S. border resizes the longer one to S,
    which a shorter side of S guarantees whatever the aspect ratio (and the pixel budget stays that of S)."""
    return scale_size(int(input_config["input_size"][-1]), input_config["crop_pct"])


def eval_pixel_budget(input_config: dict) -> int:
    """The most pixels one file may decode to for this model (images.pixel_budget of its eval resize)."""
    return pixel_budget(eval_min_side(input_config))


class ToModelInput(nn.Module):
    """uint8 batch (B, C, h, w) -> float batch at the model's size, scaled to [0, 1] and normalized.

    A batch that already has the model's size (the PIL path) is only scaled and normalized. A batch of
    another size (in-memory sets, device-decoded JPEGs) is resized and cropped (or padded) the way timm's
    eval transform does it for the config's crop_mode, in uint8 like PIL (torchvision's fast uint8
    kernels), before the float conversion.
    """

    def __init__(self, input_config: dict):
        super().__init__()
        self.image_size = int(input_config["input_size"][-1])
        self.scale_size = scale_size(self.image_size, input_config["crop_pct"])
        self.interpolation = str_to_interp_mode(input_config["interpolation"])
        self.crop_mode = crop_mode(input_config)
        self.fill = border_fill(input_config)
        mean = torch.tensor(input_config["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(input_config["std"]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def resize_crop(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 at the model's size (unchanged if it has it already)."""
        crop = [self.image_size, self.image_size]
        if images.shape[-2:] == tuple(crop):
            return images
        if self.crop_mode == "border":
            # timm's own steps (ResizeKeepRatio, center_crop_or_pad), on the batch; its pad takes one fill
            # value per call on a tensor, so one call per channel.
            size = ResizeKeepRatio.get_params(images, (self.scale_size, self.scale_size), longest=1.0)
            images = TF.resize(images, size, interpolation=self.interpolation, antialias=True)
            channels = images.split(1, dim=-3)
            return torch.cat(
                [center_crop_or_pad(c, crop, fill=f) for c, f in zip(channels, self.fill, strict=True)], -3
            )
        size = [self.scale_size, self.scale_size] if self.crop_mode == "squash" else self.scale_size
        images = TF.resize(images, size, interpolation=self.interpolation, antialias=True)
        return TF.center_crop(images, crop)

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [0, 1] at the model's size."""
        return self.resize_crop(images).float().div_(255)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """In place: `x` is the fresh tensor to_unit made."""
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.to_unit(images))
