"""How every task gets its parts: the model and data built from a config (train, the audit's folds, the bench)
or loaded from a checkpoint (eval, predict, embed, export, audit, serve), and one Trainer from `cfg.trainer`
with the callbacks and loggers the config names. The input config is decided once and handed to both the
data module and the model."""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks.progress import ProgressBar as AnyProgressBar
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from skuvision.callbacks import NoProfiler, ProgressBar
from skuvision.checkpoints import load_classifier, read_checkpoint
from skuvision.config import plain
from skuvision.data.datamodule import ImageDataModule
from skuvision.errors import SkuvisionError
from skuvision.models.classifier import Classifier
from skuvision.models.input_config import resolve_input

log = logging.getLogger("skuvision")


def build(cfg: DictConfig) -> tuple[ImageDataModule, Classifier]:
    """input config (model name + `input` overrides) -> DataModule -> Classifier."""
    source: type[ImageDataModule] = get_class(cfg.data._target_)
    input_config = resolve_input(plain(cfg.model), source.in_chans, **(plain(cfg.get("input")) or {}))
    log.info("input: %s", input_config)
    datamodule = instantiate(cfg.data, input_config=input_config, augment=cfg.get("augment") or None)
    if rank_zero_only.rank == 0:  # downloads before anything reads the files; other ranks start later
        datamodule.prepare_data()
    module = Classifier(
        model=plain(cfg.model),
        input_config=input_config,
        num_classes=datamodule.num_classes,
        in_chans=datamodule.in_chans,
        class_names=datamodule.class_names,
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.get("scheduler")) or None,
        finetune=plain(cfg.get("finetune")) or None,
        label_smoothing=cfg.get("label_smoothing", 0.0),
        class_weights=datamodule.loss_class_weights(),
        data=plain(cfg.data),
        tta=cfg.get("tta") or "none",
        heads=datamodule.heads,
        tag_loss=cfg.get("tag_loss") or "bce",
    )
    return datamodule, module


def from_checkpoint(
    ckpt_path: str | Path, data: DictConfig | None = None, split: str | None = None
) -> tuple[Classifier, ImageDataModule | None]:
    """The trained Classifier and, for a `split`, a DataModule over `data` (default: the data config the
    checkpoint was trained on) fed the checkpoint's input config, whose predict split is `split`."""
    module = load_classifier(ckpt_path)
    if split is None:
        return module, None
    datamodule = data_module(data or module.hparams.data, module.input_config, split)
    if list(datamodule.class_names) != module.class_names:
        log.warning(
            "data classes %s differ from the checkpoint's %s", datamodule.class_names, module.class_names
        )
    return module, datamodule


def data_module(data: DictConfig | dict, input_config: dict, split: str | None = None) -> ImageDataModule:
    """A DataModule over the data config `data` fed a trained model's `input_config`, whose predict split is
    `split`: no model is built."""
    # A config node keeps its parent, which its interpolations (${seed}, ...) resolve against.
    data_cfg = data if isinstance(data, DictConfig) else OmegaConf.create(data)
    return instantiate(data_cfg, input_config=input_config, predict_split=split)


def check_trainer_keys(trainer_cfg: DictConfig) -> None:
    """A key the Trainer does not take (a typo Hydra's `+` let in) in one line with the likely one, before
    Trainer(**cfg) fails with a TypeError."""
    if trainer_cfg.get("_target_") != "pytorch_lightning.Trainer":
        return
    accepted = [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]
    for key in trainer_cfg:
        if key != "_target_" and key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f"did you mean trainer.{close[0]}? " if close else ""
            raise SkuvisionError(
                f"trainer.{key} is not an argument of Lightning's Trainer: {hint}Give a key that "
                "conf/trainer/ sets, or another argument of pytorch_lightning.Trainer"
            )


def build_trainer(
    cfg: DictConfig, loggers: Sequence[Logger] = (), callbacks: Sequence[Callback] = (), **overrides: Any
) -> Trainer:
    """The Trainer `cfg.trainer` describes, with these loggers and callbacks (none: no logging and no
    callbacks of the config's) and any of its arguments overridden. Its bar, unless `callbacks` has one or
    enable_progress_bar is false, is skuvision's: none where stdout is not a terminal. Without a
    `trainer.profiler` of the config's, it profiles nothing at no cost (callbacks.NoProfiler)."""
    check_trainer_keys(cfg.trainer)
    callbacks = list(callbacks)
    bar = overrides.get("enable_progress_bar", cfg.trainer.get("enable_progress_bar", True))
    if bar and not any(isinstance(c, AnyProgressBar) for c in callbacks):
        callbacks.append(ProgressBar())
    if cfg.trainer.get("profiler") is None:
        overrides.setdefault("profiler", NoProfiler())
    return instantiate(cfg.trainer, callbacks=callbacks, logger=list(loggers) or False, **overrides)


def instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every entry of a group like `callbacks` or `logger`; null entries are switched off."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return instantiate_all(cfg)


def wandb_run_id(ckpt_path: str) -> str | None:
    """The W&B run a checkpoint was logged to (the Classifier records it when saving)."""
    return read_checkpoint(ckpt_path).get("wandb_run_id")


def instantiate_loggers(cfg: DictConfig | None, resume_from: str | None = None) -> list[Logger]:
    """`resume_from`: the checkpoint a fit resumes from; the W&B run it was logged to is continued."""
    wandb_id = None
    if resume_from and cfg and cfg.get("wandb") and not cfg.wandb.get("id"):
        wandb_id = wandb_run_id(resume_from)
    if wandb_id:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.wandb.id = wandb_id
            cfg.wandb.resume = "allow"
        log.info("resuming W&B run %s", wandb_id)
    return instantiate_all(cfg)


def close_loggers(loggers: Sequence[Logger]) -> None:
    """Finish the W&B run so the next job of a sweep starts its own."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()
