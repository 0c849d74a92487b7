"""Reading skuvision checkpoints: the one checked reader every checkpoint load goes through. A file that is
not a checkpoint train.py wrote, a corrupted one, or one whose weights do not fit its model gets one line
naming it, never an unpickling traceback."""

from __future__ import annotations

import inspect
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from hydra.errors import InstantiationException

from skuvision.errors import SkuvisionError
from skuvision.models.classifier import Classifier
from skuvision.models.input_config import INPUT_KEYS, resolve_input

# What Lightning writes into every checkpoint of a Classifier (save_hyperparameters).
REQUIRED_HPARAMS = ("model", "num_classes", "in_chans", "class_names")
MODEL_TARGET = "skuvision.models.create_backbone"
EXPECTED = "Expected a .ckpt that train.py wrote, e.g. outputs/<run>/checkpoints/best-....ckpt"


def read_checkpoint(path: str | Path, key: str = "ckpt_path", label: str | None = None) -> dict:
    """The checkpoint dict at `path` (memory-mapped: tensors are read when used), checked to be an intact
    Lightning checkpoint of a skuvision Classifier whose weights fit the model its hyperparameters describe.
    Errors name the file as `key`=path, or as `label` when given."""
    path = Path(path).expanduser()
    label = label or f"{key}={path}"
    if not path.is_file():
        raise SkuvisionError(f"{label}: no such checkpoint file")
    # Lightning saves checkpoints as torch's zip archives; anything else is not one.
    if not zipfile.is_zipfile(path):
        raise SkuvisionError(f"{label} is not a checkpoint (not a file torch.save wrote). {EXPECTED}")
    check_crcs(path, label)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise SkuvisionError(f"{label} is not a checkpoint ({load_failure(err)}). {EXPECTED}") from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        is_dict = isinstance(checkpoint, dict)
        what = "a bare state dict (weights only)" if is_dict else f"a {type(checkpoint).__name__}"
        raise SkuvisionError(
            f"{label} is {what}, not a skuvision checkpoint: give a .ckpt that train.py wrote "
            "(weights files go to model.weights)"
        )
    missing = [k for k in REQUIRED_HPARAMS if k not in hparams]
    if missing:
        raise SkuvisionError(
            f"{label} is a Lightning checkpoint of another model (no {', '.join(missing)}): give a "
            ".ckpt that skuvision's train.py wrote"
        )
    check_weights_fit(checkpoint, label)
    return checkpoint


def check_crcs(path: Path, label: str) -> None:
    """Every member of the zip against its stored CRC-32: torch.load never checks them, so flipped or zeroed
    bytes would load as silently wrong weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as err:
        raise SkuvisionError(f"{label} is not a checkpoint (a damaged zip: {err}). {EXPECTED}") from err
    if damaged is not None:
        raise SkuvisionError(
            f"{label} is corrupted: {damaged} inside it fails its CRC check (its bytes changed after "
            "torch.save wrote them); copy the file again from where it was written, or use another checkpoint"
        )


def load_failure(err: Exception) -> str:
    """torch.load's reason in a few words. Of a weights-only refusal only the refused global is kept: the
    advice around it (load with weights_only=False) is what must not be done with a file of unknown origin."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    refused = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |\.?$)", text, flags=re.MULTILINE)
    if refused:
        return f"it holds objects other than tensors and plain values, which can run code: {refused.group(1)}"
    return (text.strip().splitlines() or [type(err).__name__])[0][:160]


def check_weights_fit(checkpoint: dict, label: str) -> None:
    """The state dict against the Classifier its hyperparameters describe, built on the meta device (no
    memory, no initialisation): a missing, unexpected or wrongly shaped tensor is refused here, in one line,
    not as load_state_dict's traceback."""
    hparams = checkpoint["hyper_parameters"]
    hparams = {**hparams, **upgraded_hparams(hparams)}
    accepted = inspect.signature(Classifier.__init__).parameters
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    try:
        with torch.device("meta"):
            expected = Classifier(**{**kwargs, "load_pretrained": False}).state_dict()
    except (TypeError, ValueError, KeyError, AttributeError, InstantiationException) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise SkuvisionError(
            f"{label}: its hyperparameters do not describe a model ({reason}). {EXPECTED}"
        ) from err
    found = checkpoint["state_dict"]
    if not isinstance(found, dict):
        raise SkuvisionError(
            f"{label}: its state_dict is a {type(found).__name__}, not tensors by name. {EXPECTED}"
        )
    misfits = [f"{k} is missing" for k in expected if k not in found]
    for k, tensor in found.items():
        if k not in expected:
            misfits.append(f"{k} is in no part of the model")
        elif not isinstance(tensor, torch.Tensor):
            misfits.append(f"{k} is a {type(tensor).__name__}, not a tensor")
        elif tensor.shape != expected[k].shape:
            misfits.append(f"{k} is {list(tensor.shape)} in the file, {list(expected[k].shape)} in the model")
    if misfits:
        more = f"; {len(misfits) - 1} more" if len(misfits) > 1 else ""
        raise SkuvisionError(
            f"{label}: its weights do not fit the model its hyperparameters describe ({misfits[0]}{more}); "
            f"the file was changed after train.py wrote it. {EXPECTED}"
        )


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
    hparams = upgraded_hparams(checkpoint["hyper_parameters"])
    # A run trained with model.compile=true gives the plain module: eval, predict, embed, export and serve
    # run it as it is (export cannot trace a compiled one; the others would pay the compile for one pass).
    model = hparams.get("model", checkpoint["hyper_parameters"]["model"])
    if model.get("compile"):
        hparams["model"] = {**model, "compile": False}
    return Classifier.load_from_checkpoint(
        Path(ckpt_path).expanduser(),
        map_location=map_location,
        weights_only=True,
        load_pretrained=False,
        **hparams,
    )


RECORD = "metrics.json"  # train.py's record: "checkpoint" is the file its test used


def checkpoint_file(value: str | Path, key: str = "ckpt_path") -> Path:
    """`key`'s value as a checkpoint file: a file as given, or a train.py run folder (or its checkpoints/)
    as the checkpoint its metrics.json records as tested, looked up by name in that folder's checkpoints/
    (a record pointing elsewhere is never followed). Without a record, a folder holding one checkpoint gives
    it; several are refused, listed. A wrong path lists the checkpoints found nearby."""
    if value is None or not str(value).strip():  # Path("") would be the working folder
        raise SkuvisionError(
            f"{key} is empty: give a train.py run folder or a .ckpt in its checkpoints/, e.g. "
            f"{key}=outputs/<date>/<time>"
        )
    path = Path(str(value)).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise SkuvisionError(f"{key}={path}: no such file or folder. {nearby(path.parent)}")
    run = path.parent if path.name == "checkpoints" and (path.parent / RECORD).is_file() else path
    folder = run / "checkpoints" if (run / "checkpoints").is_dir() else path
    found = sorted(folder.glob("*.ckpt"))
    recorded = tested_record(run / RECORD)
    if recorded:
        chosen = folder / Path(recorded).name
        if chosen.is_file():
            return chosen
        raise SkuvisionError(
            f"{key}={path}: its {RECORD} names {recorded} as the tested checkpoint, which is not in "
            f"{folder}. {listing(found, folder) if found else nearby(path)}"
        )
    if len(found) == 1:
        return found[0]
    if not found:
        raise SkuvisionError(f"{key}={path} holds no checkpoint (a train.py run folder does). {nearby(path)}")
    raise SkuvisionError(
        f"{key}={path}: {len(found)} checkpoints and no tested one recorded in {run / RECORD}, so none is "
        f"chosen: {listing(found, folder)}"
    )


def resume_file(value: str | Path, last_name: str = "last.ckpt") -> Path:
    """train.py's `ckpt_path` as the file to resume from: a file as given, or a train.py run folder (or its
    checkpoints/) as its every-epoch checkpoint `last_name`, where the run stopped (not the tested one)."""
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        return path
    folder = path if path.name == "checkpoints" else path / "checkpoints"
    last = folder / last_name
    if last.is_file():
        return last
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    raise SkuvisionError(
        f"ckpt_path={path}: no {last_name} in {folder}, which a resume continues from. "
        f"{listing(found, folder) if found else nearby(path)}"
    )


def tested_record(path: Path) -> str | None:
    """The "checkpoint" a train (or eval) run's metrics.json records, or None."""
    try:
        recorded = json.loads(path.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) and recorded else None


def nearby(folder: Path) -> str:
    """The checkpoints in the nearest existing folder at or above `folder`, its checkpoints/ and its
    subfolders' checkpoints/ (sibling run folders), as a sentence."""
    for _ in range(3):
        if folder.is_dir():
            break
        folder = folder.parent
    if not folder.is_dir():
        return "Give a train.py run folder or a .ckpt in its checkpoints/."
    found = sorted(
        {*folder.glob("*.ckpt"), *folder.glob("checkpoints/*.ckpt"), *folder.glob("*/checkpoints/*.ckpt")}
    )
    if not found:
        return (
            f"No checkpoint in or below {folder}: give a train.py run folder or a .ckpt in its checkpoints/."
        )
    return listing(found, folder)


def listing(found: list[Path], folder: Path, shown: int = 6) -> str:
    names = [str(p.relative_to(folder)) for p in found[:shown]]
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return f"Checkpoints in {folder}: {', '.join(names)}{more}"
