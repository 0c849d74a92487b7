"""What a dataset yields (uint8 CHW tensors) as a picture: for galleries, plots, encoding and image checks."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.v2.functional import to_pil_image


def pil_image(image: torch.Tensor) -> Image.Image:
    """A uint8 (C, H, W) image as PIL: mode L for one channel, RGB for three (np.asarray of it gives the
    (H, W) or (H, W, C) array)."""
    return to_pil_image(image)
