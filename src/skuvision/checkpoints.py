"""Reading skuvision checkpoints: a file that is not one gets one line, never an unpickling traceback."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from skuvision.errors import SkuvisionError
from skuvision.models.classifier import Classifier
from skuvision.models.input_config import INPUT_KEYS, resolve_input

# What Lightning writes into every checkpoint of a Classifier (save_hyperparameters).
REQUIRED_HPARAMS = ("model", "num_classes", "in_chans", "class_names")
MODEL_TARGET = "skuvision.models.create_backbone"


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict:
    """The checkpoint dict at `path` (memory-mapped: tensors are read when used), checked to be a
    Lightning checkpoint of a skuvision Classifier. `key` names the setting in the error message."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SkuvisionError(f"{key}={path}: no such checkpoint file")
    expected = "Expected a .ckpt that train.py wrote, e.g. outputs/<run>/checkpoints/best-....ckpt"
    # Lightning saves checkpoints as torch's zip archives; anything else is not one.
    if not zipfile.is_zipfile(path):
        raise SkuvisionError(f"{key}={path} is not a checkpoint (not a file torch.save wrote). {expected}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise SkuvisionError(f"{key}={path} is not a checkpoint ({reason}). {expected}") from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        is_dict = isinstance(checkpoint, dict)
        what = "a bare state dict (weights only)" if is_dict else f"a {type(checkpoint).__name__}"
        raise SkuvisionError(
            f"{key}={path} is {what}, not a skuvision checkpoint: give a .ckpt that train.py wrote "
            "(weights files go to model.weights)"
        )
    missing = [k for k in REQUIRED_HPARAMS if k not in hparams]
    if missing:
        raise SkuvisionError(
            f"{key}={path} is a Lightning checkpoint of another model (no {', '.join(missing)}): give a "
            ".ckpt that skuvision's train.py wrote"
        )
    return checkpoint


def upgraded_hparams(hparams: dict) -> dict:
    """Hyperparameters that checkpoints of earlier skuvision versions lack, derived from what they hold:
    the model config's `_target_`, and the input config (they kept only the user's overrides, in the data
    config)."""
    changes = {}
    data = hparams.get("data") or {}
    if any(k in data for k in INPUT_KEYS):
        changes["data"] = {k: v for k, v in data.items() if k not in INPUT_KEYS}
    if "_target_" not in hparams["model"]:
        changes["model"] = {"_target_": MODEL_TARGET, **hparams["model"]}
    if "input_config" not in hparams:
        overrides = {k: v for k, v in (hparams.get("input_overrides") or {}).items() if v is not None}
        changes["input_config"] = resolve_input(hparams["model"], hparams["in_chans"], **overrides)
    return changes


def load_classifier(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """A trained Classifier from its checkpoint, loaded with weights_only=True and no weights download."""
    checkpoint = read_checkpoint(ckpt_path)
    return Classifier.load_from_checkpoint(
        Path(ckpt_path).expanduser(),
        map_location=map_location,
        weights_only=True,
        load_pretrained=False,
        **upgraded_hparams(checkpoint["hyper_parameters"]),
    )
