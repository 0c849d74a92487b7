"""Training augmentation presets (conf/augment). Evaluation batches are never augmented.

A preset acts at up to three points, each the cheapest place for its kind of work:
- `image_transform(input_config)`: a per-image PIL transform (timm's create_transform) for operations that
  only exist per image (RandAugment, TrivialAugment-style). It puts in-memory sets on the per-image path.
- `on_batch(x)`: on the device, on the whole batch in [0, 1] at the model's size (random affine).
- `after_normalize(x, y)`: on the device, on the normalized batch and its labels (Mixup/CutMix with soft
  targets, random erasing), with timm's own implementations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing


class TrainAugment:
    """Base preset: random erasing of a fraction `re_prob` of images (timm's RandomErasing), nothing else."""

    needs_even_batch = False

    def __init__(self, re_prob: float = 0.0):
        self.re_prob = float(re_prob)
        self._erasing: RandomErasing | None = None

    def image_transform(self, input_config: dict):
        return None

    def min_decode_side(self, input_config: dict) -> int | None:
        """The shorter side a file must be decoded to for `image_transform`; None: full size."""
        return None

    def on_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def after_normalize(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.re_prob > 0:
            if self._erasing is None or self._erasing.device != str(x.device):
                self._erasing = RandomErasing(self.re_prob, mode="pixel", device=str(x.device))
            x = self._erasing(x)
        return x, y


class BatchAffine(TrainAugment):
    """One random affine per image (flip, shift, rotation, shear, zoom: the Keras ImageDataGenerator
    recipe) as a single grid_sample call on the batch; borders are filled with `fill` (0 black, 1 white)."""

    def __init__(
        self,
        hflip: float = 0.5,
        translate: float = 0.1,
        rotate: float = 10.0,
        shear: float = 5.0,
        scale: Sequence[float] = (0.9, 1.1),
        fill: float = 0.0,
        re_prob: float = 0.0,
    ):
        super().__init__(re_prob)
        self.hflip = hflip
        self.translate = translate
        self.rotate = math.radians(rotate)
        self.shear = math.radians(shear)
        self.scale = (float(scale[0]), float(scale[1]))
        self.fill = fill

    def matrices(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, 2, 3) maps from output to input coordinates in [-1, 1], as affine_grid expects."""

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.empty(batch, device=device).uniform_(low, high)

        angle = uniform(-self.rotate, self.rotate)
        shear = uniform(-self.shear, self.shear)
        zoom = uniform(*self.scale)
        flip = torch.where(torch.rand(batch, device=device) < self.hflip, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0] = cos * flip / zoom
        theta[:, 0, 1] = (-sin + torch.tan(shear) * cos) / zoom
        theta[:, 1, 0] = sin * flip / zoom
        theta[:, 1, 1] = (cos + torch.tan(shear) * sin) / zoom
        theta[:, :, 2] = torch.empty(batch, 2, device=device).uniform_(
            -2 * self.translate, 2 * self.translate
        )
        return theta

    def on_batch(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.matrices(x.shape[0], x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Shift by the fill value so zero padding pads with `fill`.
        out = F.grid_sample(x - self.fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out + self.fill


class ImageAugment(TrainAugment):
    """timm's training transform per image: random resized crop (`scale`), flips and an auto-augment policy
    (`auto_augment`, e.g. "rand-m9-mstd0.5-inc1" for RandAugment)."""

    def __init__(
        self,
        auto_augment: str | None = None,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        re_prob: float = 0.0,
    ):
        super().__init__(re_prob)
        self.auto_augment = auto_augment
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.vflip = vflip

    def image_transform(self, input_config: dict):
        return create_transform(
            input_size=tuple(input_config["input_size"]),
            is_training=True,
            scale=self.scale,
            ratio=self.ratio,
            hflip=self.hflip,
            vflip=self.vflip,
            auto_augment=self.auto_augment,
            interpolation=input_config["interpolation"],
            mean=tuple(input_config["mean"]),
            std=tuple(input_config["std"]),
            use_prefetcher=True,  # ends in a uint8 tensor: normalization runs on the batch
        )

    def min_decode_side(self, input_config: dict) -> int:
        # The smallest random crop (area fraction scale[0]) gets its pixels from the file, not upsampled.
        return math.ceil(int(input_config["input_size"][-1]) / math.sqrt(self.scale[0]))


class MixupCutmix(TrainAugment):
    """timm's Mixup/CutMix on the batch: labels become soft targets (each row sums to 1), trained with a
    soft-target cross-entropy; `label_smoothing` is applied by timm's Mixup."""

    needs_even_batch = True  # timm pairs each image with its mirror in the batch

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.1,
        re_prob: float = 0.0,
    ):
        super().__init__(re_prob)
        self.options = dict(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode=mode,
            label_smoothing=label_smoothing,
        )
        self.mixup: Mixup | None = None

    def after_normalize(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().after_normalize(x, y)
        if self.mixup is None:
            raise RuntimeError("MixupCutmix.set_num_classes must be called before training")
        return self.mixup(x, y)

    def set_num_classes(self, num_classes: int) -> None:
        self.mixup = Mixup(num_classes=num_classes, **self.options)


class ShiftFlip(TrainAugment):
    """Random crop with padding and a horizontal flip, per image, on the batch: each image moves by a whole
    number of pixels, up to `pad` (a fraction of the image size), the uncovered border filled with `fill`.
    The classic small-image recipe (CIFAR, Fashion-MNIST)."""

    def __init__(self, pad: float = 0.1, hflip: float = 0.5, fill: float = 0.0, re_prob: float = 0.0):
        super().__init__(re_prob)
        self.pad = float(pad)
        self.hflip = float(hflip)
        self.fill = float(fill)

    def on_batch(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pad = round(self.pad * max(h, w))
        if not pad:  # flip only (augment=flip): the gather below would copy the batch for nothing
            return self.flip(x)
        padded = F.pad(x, (pad, pad, pad, pad), value=self.fill)
        top = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device)
        left = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device)
        rows = (top + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (left + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channels = torch.arange(c, device=x.device)[None, :, None, None]
        return self.flip(padded[batch, channels, rows, cols])

    def flip(self, x: torch.Tensor) -> torch.Tensor:
        if self.hflip <= 0:
            return x
        flip = (torch.rand(x.shape[0], device=x.device) < self.hflip)[:, None, None, None]
        return torch.where(flip, x.flip(-1), x)
