"""The model's input config, and the batched uint8 -> normalized float step that both data paths end in.

Datasets yield uint8 CHW tensors. Resizing (in-memory sets only), scaling and normalization run on whole
batches after they reach the device, so per-image CPU work stays minimal and the host->device copy is uint8.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_model_data_config
from torch import nn

INPUT_KEYS = ("image_size", "mean", "std", "interpolation", "crop_pct")


def resolve_input_config(model: nn.Module, in_chans: int, **overrides: Any) -> dict:
    """Input size, mean/std, interpolation and crop from timm's pretrained config; non-null overrides win.

    With one input channel, mean and std are the averages of the RGB ones: timm's in_chans=1 adaptation sums
    the pretrained first-conv filters, which is what a replicated gray image would see.
    """
    unknown = set(overrides) - set(INPUT_KEYS)
    if unknown:
        raise ValueError(f"unknown input override(s) {sorted(unknown)}; known: {INPUT_KEYS}")
    cfg = resolve_model_data_config(model)
    size = overrides.get("image_size") or cfg["input_size"][-1]
    mean = overrides.get("mean") or cfg["mean"]
    std = overrides.get("std") or cfg["std"]
    if len(mean) != in_chans:
        mean = [sum(mean) / len(mean)] * in_chans
    if len(std) != in_chans:
        std = [sum(std) / len(std)] * in_chans
    return {
        "input_size": [in_chans, int(size), int(size)],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": str(overrides.get("interpolation") or cfg["interpolation"]),
        "crop_pct": float(overrides.get("crop_pct") or cfg["crop_pct"]),
    }


def pil_transform(input_config: dict):
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


class BatchNormalizer(nn.Module):
    """uint8 batch (B, C, h, w) -> float batch at the model's size, scaled to [0, 1] and normalized.

    A batch that already has the model's size (the PIL path) is only scaled and normalized. A batch of
    another size (in-memory sets) is resized and center-cropped the way timm's eval transform does it.
    """

    def __init__(self, input_config: dict):
        super().__init__()
        self.image_size = int(input_config["input_size"][-1])
        self.scale_size = scale_size(self.image_size, input_config["crop_pct"])
        self.mode = input_config["interpolation"]
        if self.mode not in ("nearest", "bilinear", "bicubic"):
            self.mode = "bilinear"
        mean = torch.tensor(input_config["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(input_config["std"]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [0, 1] at the model's size."""
        x = images.float().div_(255)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = resize_center_crop(x, self.scale_size, self.image_size, self.mode)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.to_unit(images))


def resize_center_crop(x: torch.Tensor, scale: int, size: int, mode: str) -> torch.Tensor:
    """Resize the shorter side to `scale`, then crop the center `size` square (PIL-like antialiasing)."""
    h, w = x.shape[-2:]
    if h <= w:
        new_hw = (scale, max(scale, round(w * scale / h)))
    else:
        new_hw = (max(scale, round(h * scale / w)), scale)
    antialias = mode != "nearest"
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    x = F.interpolate(x, size=new_hw, mode=mode, antialias=antialias, **kwargs).clamp_(0, 1)
    top = (new_hw[0] - size) // 2
    left = (new_hw[1] - size) // 2
    return x[..., top : top + size, left : left + size]
