"""evaluate(cfg): a checkpoint on its test split (or another data config) -> metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import seed_everything

from skuvision.models.classifier import load_classifier
from skuvision.tasks.utils import close_loggers, instantiate_loggers, set_threads, stage_metrics, write_json

log = logging.getLogger("skuvision")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    set_threads(cfg.get("threads"))
    seed_everything(cfg.seed, workers=True)
    module = load_classifier(cfg.ckpt_path)
    data_cfg = cfg.get("data") or OmegaConf.create(module.hparams.data)
    datamodule = instantiate(data_cfg)
    if list(datamodule.class_names) != module.class_names:
        log.warning(
            "data classes %s differ from the checkpoint's %s", datamodule.class_names, module.class_names
        )
    datamodule.set_input_config(module.input_config)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    try:
        trainer.test(module, datamodule=datamodule)
        metrics = stage_metrics(trainer, "test/")
        write_json(Path(cfg.paths.output_dir) / "metrics.json", {**metrics, "checkpoint": str(cfg.ckpt_path)})
        print(f"test/acc = {metrics.get('test/acc', float('nan')):.4f}   run folder: {cfg.paths.output_dir}")
        return metrics
    finally:
        close_loggers(loggers)
