"""Test-time augmentation: the mean of the logits over a few transformed views of each batch.

Views act on the normalized batch at the model's size: a horizontal flip, and shifts by 1/16 of the image
(edges replicated), so every data path and task gets the same views.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from skuvision.errors import SkuvisionError

TTA_MODES = ("none", "flip", "flip_shift")
SHIFT_FRACTION = 1 / 16


def check_tta(mode: str, key: str = "tta") -> str:
    if mode not in TTA_MODES:
        raise SkuvisionError(f"{key}={mode!r}: use one of {', '.join(TTA_MODES)}")
    return mode


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The batch moved by (dy, dx) pixels, the uncovered border filled with the edge pixels."""
    if not dy and not dx:
        return images
    pad = max(abs(dy), abs(dx))
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    h, w = images.shape[-2:]
    top, left = pad - dy, pad - dx
    return padded[..., top : top + h, left : left + w]


def views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The batches a model sees under `mode`, the original first."""
    if mode == "none":
        return [images]
    both = [images, images.flip(-1)]
    if mode == "flip":
        return both
    step = max(1, round(images.shape[-1] * SHIFT_FRACTION))
    return both + [shifted(x, d, d) for d in (step, -step) for x in both]


def tta_logits(forward: Callable, images: torch.Tensor, mode: str, first=None):
    """The mean of `forward`'s logits over the views of `images` (float32); a forward giving {head: logits}
    gets each head's mean. `first`: the original view's logits, when already computed."""
    shown = views(images, mode)
    outputs = ([forward(shown[0])] if first is None else [first]) + [forward(view) for view in shown[1:]]
    if isinstance(outputs[0], dict):
        return {key: mean_of([out[key] for out in outputs]) for key in outputs[0]}
    return mean_of(outputs)


def mean_of(logits: list[torch.Tensor]) -> torch.Tensor:
    logits = [x.float() for x in logits]
    return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)
