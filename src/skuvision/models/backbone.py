"""Backbone creation: any timm model, with weights from a local file, an offline package, or the hub.

The hub is tried only when it is reachable or its file is cached already, so `pretrained=true` without a
network fails in seconds with a message naming `model.weights`, instead of retrying a download.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from skuvision.errors import SkuvisionError
from skuvision.models import simple_cnn  # noqa: F401  (registers simple_cnn with timm)
from skuvision.models.offline_weights import offline_weights_file
from skuvision.net import host_reachable

log = logging.getLogger(__name__)

HF_HOST = "huggingface.co"


def create_backbone(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: bool = False,
    weights: str | None = None,
    **model_kwargs,
) -> nn.Module:
    """timm.create_model with a new head for `num_classes` and a first conv adapted to `in_chans`."""
    model = _create(name, num_classes, in_chans, pretrained, weights, **model_kwargs)
    if pretrained or weights:
        zero_new_head(model, num_classes)
    return model


def zero_new_head(model: nn.Module, num_classes: int) -> None:
    """A new head on pretrained features starts at zero, so training starts from uniform predictions.

    timm initializes a new classifier for the architecture (EfficientNet scales it by 1/sqrt(num_classes)),
    which on pretrained features gives logits of +-10 for a few classes: the loss starts near 10 instead of
    ln(K), and the first epoch goes to undoing it. A head that the weights file supplied is kept.
    """
    if model.pretrained_cfg.get("num_classes") == num_classes:
        return
    with torch.no_grad():
        for param in model.get_classifier().parameters():
            param.zero_()


def _create(
    name: str, num_classes: int, in_chans: int, pretrained: bool, weights: str | None, **model_kwargs
):
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise SkuvisionError(f"unknown model.name={name!r}: not a timm model.{hint} See timm.list_models().")
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, **model_kwargs}
    if weights:
        return _from_file(name, Path(weights).expanduser(), kwargs, key="model.weights")
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    packaged = offline_weights_file(name)
    if packaged is not None:
        log.info("%s: ImageNet weights from the installed offline package (%s)", name, packaged)
        return _from_file(name, packaged, kwargs, key="model.weights")
    cached = _hub_cached_file(name)
    if cached is not None:
        log.info("%s: pretrained weights from the local hub cache (%s)", name, cached)
        return _from_file(name, cached, kwargs, key="model.weights")
    host = _weights_host(name)
    if host is None:
        raise SkuvisionError(
            f"timm has no pretrained weights for model.name={name}; set model.pretrained=false or give "
            f"model.weights=/path/to/weights.pth"
        )
    if not host_reachable(host):
        raise SkuvisionError(
            f"model.pretrained=true but no weights for {name}: {host} is unreachable and model.weights is "
            f"unset. Fix: download the weights where there is network and pass model.weights=/path/to/file "
            f"(.pth or .safetensors), or set model.pretrained=false to train from scratch."
        )
    return timm.create_model(name, pretrained=True, **kwargs)


def _from_file(name: str, path: Path, kwargs: dict, key: str) -> nn.Module:
    if not path.is_file():
        raise SkuvisionError(
            f"{key}={path}: no such file. Give the path of a .pth or .safetensors state dict."
        )
    try:
        # timm drops or adapts the classifier for num_classes and the first conv for in_chans.
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SkuvisionError(
            f"{key}={path} does not fit {name}: {first_line[:300]}. Give a state dict saved from timm's "
            f"{name} (or one timm converts, e.g. torchvision's)."
        ) from err


def _weights_host(name: str) -> str | None:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        return HF_HOST
    if cfg.url:
        return urlparse(cfg.url).hostname
    return None


def _hub_cached_file(name: str) -> Path | None:
    """The weights file for `name` if a previous online run left it in the HF or torch hub cache."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if cached.is_file():
            return cached
    return None
