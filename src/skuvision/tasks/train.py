"""train(cfg): data + backbone -> Classifier -> Trainer.fit -> test of the best checkpoint -> metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning import LightningDataModule, seed_everything

from skuvision.models.classifier import Classifier
from skuvision.tasks.utils import (
    close_loggers,
    instantiate_callbacks,
    instantiate_loggers,
    plain,
    set_threads,
    stage_metrics,
    write_json,
)

log = logging.getLogger("skuvision")


def build(cfg: DictConfig) -> tuple[LightningDataModule, Classifier]:
    """The DataModule and the Classifier; the model's pretrained config decides the data's input."""
    datamodule = instantiate(cfg.data)
    module = Classifier(
        model=plain(cfg.model),
        num_classes=datamodule.num_classes,
        in_chans=datamodule.in_chans,
        class_names=datamodule.class_names,
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.get("scheduler")) or None,
        input_overrides=datamodule.input_overrides,
        label_smoothing=cfg.get("label_smoothing", 0.0),
        data=plain(cfg.data),
    )
    datamodule.set_input_config(module.input_config)
    log.info("input: %s", module.input_config)
    return datamodule, module


def train(cfg: DictConfig) -> dict[str, float]:
    set_threads(cfg.get("threads"))
    seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule, module = build(cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        for logger in loggers:
            logger.log_hyperparams({**plain(cfg), "class_names": datamodule.class_names})
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
        metrics = stage_metrics(trainer, "val/")
        if cfg.get("test", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            # fast_dev_run saves no checkpoint: test the weights in memory then.
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update(stage_metrics(trainer, "test/"))
            metrics_out = {**metrics, "best_checkpoint": best or None}
            write_json(output_dir / "metrics.json", metrics_out)
            if "test/acc" in metrics:
                log.info("test accuracy %.4f (best checkpoint: %s)", metrics["test/acc"], best or "none")
                print(f"test/acc = {metrics['test/acc']:.4f}   run folder: {output_dir}")
        return metrics
    finally:
        close_loggers(loggers)
