"""The two ways a task gets its model and data: built from a config (train), or loaded from a checkpoint
(eval, predict, embed, export). Either way the input config is decided once and handed to both."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from skuvision.checkpoints import load_classifier
from skuvision.data.datamodule import ImageDataModule
from skuvision.models.classifier import Classifier
from skuvision.models.input_config import resolve_input
from skuvision.tasks.utils import plain

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
    data_cfg = data if data else OmegaConf.create(module.hparams.data)
    datamodule = instantiate(data_cfg, input_config=module.input_config, predict_split=split)
    if list(datamodule.class_names) != module.class_names:
        log.warning(
            "data classes %s differ from the checkpoint's %s", datamodule.class_names, module.class_names
        )
    return module, datamodule
