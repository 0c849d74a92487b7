"""Backbone creation: any timm model, with weights from a local file, an offline package, or the hub.

The hub is tried only when it is reachable or its file is cached already, so `pretrained=true` without a
network fails in seconds with a message naming `model.weights`, instead of retrying a download.
A file must supply every backbone tensor (weights_check); one in a known foreign layout is converted first
(offline_weights).
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from skuvision.compat import inductor_cpp_compiler
from skuvision.errors import SkuvisionError
from skuvision.models.input_config import check_model_name
from skuvision.models.offline_weights import converted_file, foreign_layout, offline_weights_file
from skuvision.models.weights_check import UNREADABLE, backbone_params, not_loaded, read_state, same_init
from skuvision.net import host_reachable

log = logging.getLogger(__name__)

HF_HOST = "huggingface.co"


def create_backbone(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: bool = False,
    weights: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    kwargs: dict | None = None,
) -> nn.Module:
    """timm.create_model with a new head for `num_classes` and a first conv adapted to `in_chans`: what a
    conf/model option builds. `kwargs` go to timm.create_model."""
    model = _create(name, num_classes, in_chans, pretrained, weights, **(kwargs or {}))
    if pretrained or weights:
        zero_new_head(model, num_classes)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        check_compile()
        # In place: the state dict keeps its keys, so checkpoints load with or without compile.
        model.compile()
    return model


def check_compile() -> None:
    """model.compile=true where torch.compile cannot build its kernels fails here, in one line, and not after
    the data is loaded, at the first step."""
    if inductor_cpp_compiler() is None:
        raise SkuvisionError(
            "model.compile=true needs a C++ compiler for torch.compile (its inductor backend builds kernels "
            "with $CXX, else g++), and none was found: install one (apt-get install g++), set CXX, or set "
            "model.compile=false"
        )


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
    check_model_name(name)
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
    return _from_file(name, _download(name, kwargs), kwargs, key="model.pretrained")


def _download(name: str, kwargs: dict) -> Path:
    """timm's hub weights for `name`, fetched into the hub cache. The file is then loaded like any other, so
    a first download gets the same coverage check as a cached one."""
    timm.create_model(name, pretrained=True, **kwargs)
    downloaded = _hub_cached_file(name)
    if downloaded is None:
        raise SkuvisionError(
            f"model.pretrained=true: timm fetched weights for {name} but no weights file is in the hub cache "
            f"to check them against; download the file and pass model.weights=/path/to/file"
        )
    return downloaded


def _from_file(name: str, path: Path, kwargs: dict, key: str) -> nn.Module:
    """timm's model loaded from a local file, refused unless the file supplied every backbone tensor."""
    if not path.is_file():
        raise SkuvisionError(
            f"{key}={path}: no such file. Give the path of a .pth or .safetensors state dict."
        )
    with same_init():
        scratch = timm.create_model(name, pretrained=False, **kwargs)
    total = len(backbone_params(scratch))
    file, state = path, read_state(path)
    layout = foreign_layout(state)
    if layout:
        try:
            file = converted_file(path, name, layout, state)
        except SkuvisionError as err:
            raise SkuvisionError(
                _coverage_error(key, path, name, 0, total, f"{layout} layout: {err}")
            ) from err
        state = read_state(file)
    try:
        # timm drops or adapts the classifier for num_classes and the first conv for in_chans.
        with same_init():
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs
            )
    except UNREADABLE as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SkuvisionError(
            f"{key}={path} does not fit {name}: {first_line[:300].rstrip('.')}. Give a state dict saved "
            f"from timm's {name} (or one timm converts, e.g. torchvision's)."
        ) from err
    missing = not_loaded(model, scratch, state)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        matched = total - len(missing)
        raise SkuvisionError(_coverage_error(key, path, name, matched, total, f"not loaded: {shown}"))
    log.info("%s: loaded all %d backbone tensors from %s", name, total, file)
    return model


def _coverage_error(key: str, path: Path, name: str, matched: int, total: int, detail: str) -> str:
    return (
        f"{key}={path} matched {matched} of {total} backbone tensors of {name} ({detail}). Fix: give a state "
        f"dict saved from timm's {name} (or one timm converts), or set model.weights=null "
        f"model.pretrained=false to train from scratch."
    )


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
