"""The model's input config (size, mean/std, interpolation, crop), resolved once from the model's NAME.

timm keeps each architecture's input metadata in its pretrained config, so no model is built to read it.
The run's `input` overrides win over it. The result is a dict of plain values: it goes into the DataModule,
the Classifier and the checkpoint unchanged.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.data import resolve_data_config
from timm.data.loader import adapt_to_chs

from skuvision.data.transforms import check_crop_mode
from skuvision.errors import SkuvisionError
from skuvision.models import simple_cnn  # noqa: F401  (registers simple_cnn with timm)

INPUT_KEYS = ("image_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def check_model_name(name: str | None) -> None:
    if name in (None, "", "???"):
        raise SkuvisionError("model.name is not set: choose model=<option>, or model=timm model.name=<name>")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise SkuvisionError(f"unknown model.name={name!r}: not a timm model.{hint} See timm.list_models().")


def resolve_input(model: dict, in_chans: int, **overrides: Any) -> dict:
    """{input_size, mean, std, interpolation, crop_pct, crop_mode} for `model` (a model config: name,
    kwargs) fed `in_chans` channels; non-null overrides win.

    With one input channel, mean and std are the averages of the RGB ones: timm's in_chans=1 adaptation sums
    the pretrained first-conv filters, which is what a replicated gray image would see.
    """
    unknown = set(overrides) - set(INPUT_KEYS)
    if unknown:
        raise SkuvisionError(f"unknown input key(s) {sorted(unknown)}: use {', '.join(INPUT_KEYS)}")
    check_model_name(model["name"])
    pretrained_cfg = timm.models.get_pretrained_cfg(model["name"])
    cfg = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    # Models built for another size (timm's img_size argument) take that size.
    size = overrides.get("image_size") or (model.get("kwargs") or {}).get("img_size") or cfg["input_size"][-1]
    mean = adapt_to_chs(overrides.get("mean") or cfg["mean"], in_chans)
    std = adapt_to_chs(overrides.get("std") or cfg["std"], in_chans)
    return {
        "input_size": [in_chans, int(size), int(size)],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": str(overrides.get("interpolation") or cfg["interpolation"]),
        "crop_pct": float(overrides.get("crop_pct") or cfg["crop_pct"]),
        "crop_mode": check_crop_mode(str(overrides.get("crop_mode") or cfg.get("crop_mode") or "center")),
    }
