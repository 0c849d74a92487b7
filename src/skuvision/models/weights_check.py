"""Which backbone parameters a weights file really supplied.

timm loads a file non-strictly when it adapts the head or the first conv, and then only logs the keys it
missed: a file in another layout loads nothing and training silently starts from random init. timm's
per-architecture checkpoint filters may rename and reshape tensors on the way, so the file's keys cannot be
compared with the model's. Instead the model is built a second time from the same seed without the file: a
parameter still bit-identical to that random twin was not loaded.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from torch import nn

SEED = 0

# What timm's reader raises for a file that is not a state dict it can read.
UNREADABLE = (
    RuntimeError,
    KeyError,
    ValueError,
    OSError,
    AttributeError,
    pickle.UnpicklingError,
    SafetensorError,
)


@contextlib.contextmanager
def same_init() -> Iterator[None]:
    """Seed the CPU generator, where timm initializes models, and restore the caller's state afterwards.

    Only the CPU generator: seeding CUDA here would override the user's own seed for the rest of the run.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(SEED)
        yield


def read_state(path: Path) -> dict:
    """The file's tensors as timm reads them (unwrapped, `module.` stripped); empty when timm's reader can't.

    An unreadable file is left to timm's own load, which reports why, or knows a custom format (.npz).
    """
    try:
        return timm.models.load_state_dict(str(path))
    except UNREADABLE:
        return {}


def backbone_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters outside the classifier (buffers excluded: a file may rightly lack BatchNorm's counters)."""
    head = {id(p) for p in model.get_classifier().parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) not in head}


def not_loaded(model: nn.Module, scratch: nn.Module, state: dict) -> list[str]:
    """Backbone parameters of `model` that kept their init: equal to `scratch`, built from the same seed.

    Constant inits (BatchNorm's ones and zeros) equal the twin whether loaded or not; such a parameter counts
    as loaded when the file holds that very value under its name, as an untrained timm checkpoint does.
    """
    init = dict(scratch.named_parameters())
    return [
        name
        for name, param in backbone_params(model).items()
        if torch.equal(param, init[name]) and not _holds(state.get(name), param)
    ]


def _holds(tensor, param: nn.Parameter) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.shape == param.shape and torch.equal(tensor, param)
