"""train(cfg): data + backbone -> Classifier -> Trainer.fit -> test of the best checkpoint -> metrics.json."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning import LightningDataModule, Trainer, seed_everything
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.environments import LightningEnvironment
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities import rank_zero_only

from skuvision.callbacks import TrainingThroughput
from skuvision.config import in_multirun
from skuvision.errors import SkuvisionError
from skuvision.finetune import LinearProbe, stage_param_names
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
    datamodule = instantiate(cfg.data, augment=cfg.get("augment") or None)
    module = Classifier(
        model=plain(cfg.model),
        num_classes=datamodule.num_classes,
        in_chans=datamodule.in_chans,
        class_names=datamodule.class_names,
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.get("scheduler")) or None,
        finetune=plain(cfg.get("finetune")) or None,
        input_overrides=datamodule.input_overrides,
        label_smoothing=cfg.get("label_smoothing", 0.0),
        class_weights=datamodule.loss_class_weights(),
        data=plain(cfg.data),
    )
    datamodule.set_input_config(module.input_config)
    log.info("input: %s", module.input_config)
    return datamodule, module


def write_data_report(datamodule: LightningDataModule, output_dir: Path) -> None:
    """class_counts.json per split, and skipped_images.json when unreadable images were left out."""
    counts = datamodule.class_counts()
    write_json(
        output_dir / "class_counts.json",
        {split: dict(zip(datamodule.class_names, c, strict=True)) for split, c in counts.items()},
    )
    skipped = getattr(datamodule, "skipped", None)
    if skipped:
        write_json(output_dir / "skipped_images.json", skipped)
        log.warning(
            "%d unreadable image(s) skipped: listed in %s", len(skipped), output_dir / "skipped_images.json"
        )


def ddp_strategy(trainer_cfg: DictConfig, module: Classifier):
    """DDP must be told when parameters go unused (frozen stages get no gradient), or it raises.

    Unused-parameter detection costs a graph traversal per step, so it is switched on only for strategies
    that freeze something during the run.
    """
    strategy = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, str) or not strategy.startswith("ddp") or "find_unused" in strategy:
        return strategy
    num_stages = len(stage_param_names(module.backbone))
    epochs = range(max(1, int(trainer_cfg.get("max_epochs") or 1)))
    if any(module.finetune.frozen_stages(epoch, num_stages) for epoch in epochs):
        log.info("%s with frozen stages: using %s_find_unused_parameters_true", strategy, strategy)
        return f"{strategy}_find_unused_parameters_true"
    return strategy


def check_devices(trainer_cfg: DictConfig) -> None:
    """GPU settings on a machine without (enough) GPUs fail here in one line, not in Lightning or torch."""
    accelerator = trainer_cfg.get("accelerator")
    visible = torch.cuda.device_count()
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not visible)
    if on_cpu and trainer_cfg.get("sync_batchnorm"):  # torch's SyncBatchNorm would fail at the first step
        raise SkuvisionError("trainer.sync_batchnorm=true needs GPUs: set it false on the CPU")
    if accelerator not in ("gpu", "cuda"):
        return
    if visible == 0:
        raise SkuvisionError(
            f"trainer.accelerator={accelerator} but no GPU is visible: use trainer=cpu, "
            "or trainer=ddp_cpu for several processes on the CPU"
        )
    devices = trainer_cfg.get("devices")
    if isinstance(devices, int) and devices > visible:
        raise SkuvisionError(
            f"trainer.devices={devices} but {visible} GPU(s) are visible: use trainer.devices={visible}"
        )


def check_launch(trainer: Trainer, strategy: str) -> None:
    """Launches that would hang. Lightning's `ddp` starts the other processes by re-running the command
    line: in a multirun that line is the whole sweep (or submitit's runner), so the processes never meet."""
    if in_multirun() and isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher):
        raise SkuvisionError(
            f"trainer.strategy={strategy} cannot run inside a multirun (-m): use "
            "trainer=ddp_spawn (or trainer.strategy=ddp_spawn), or hydra/launcher=slurm on a SLURM cluster"
        )
    # Without a cluster (SLURM, torchrun) or MASTER_ADDR, rank zero would wait forever for the other nodes.
    alone = isinstance(getattr(trainer.strategy, "cluster_environment", None), LightningEnvironment)
    if trainer.num_nodes > 1 and alone and "MASTER_ADDR" not in os.environ:
        raise SkuvisionError(
            f"trainer.num_nodes={trainer.num_nodes} needs its nodes started together: submit with "
            "hydra/launcher=slurm, or set MASTER_ADDR, MASTER_PORT and NODE_RANK on every node"
        )


def resume_path(cfg: DictConfig) -> str | None:
    """`ckpt_path` when given; else the run folder's last.ckpt when there is one, which happens only when a
    run re-enters its folder: a SLURM job requeued after a timeout or preemption resumes where it stopped."""
    if cfg.get("ckpt_path"):
        return cfg.ckpt_path
    last = (cfg.get("callbacks") or {}).get("last_checkpoint")
    if last is None:
        return None
    path = Path(last.dirpath) / f"{last.filename}.ckpt"
    if not path.is_file():
        return None
    log.info("resuming from %s, left by an earlier attempt of this run", path)
    return str(path)


def find_lr(cfg: DictConfig, module: Classifier, datamodule: LightningDataModule) -> float:
    """Lightning's LR finder on the head phase (backbone frozen); sets optimizer.lr so the head gets the
    suggested LR and every other group keeps its configured ratio to it.

    The finder gives all param groups one LR while it sweeps, which is harmless only while just the head
    trains: hence the linear probe during the sweep.
    """
    strategy = module.finetune
    probe = LinearProbe(head_lr_scale=strategy.head_lr_scale, train_bn=strategy.train_bn)
    probe.apply(
        module.backbone, epoch=0
    )  # the finder sweeps inside on_fit_start, before other callbacks' hooks
    module.finetune = probe
    tuner_trainer = instantiate(
        cfg.trainer,
        callbacks=[],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(Path(cfg.paths.output_dir) / "lr_find"),
    )
    try:
        finder = Tuner(tuner_trainer).lr_find(
            module,
            datamodule=datamodule,
            min_lr=cfg.lr_find.min_lr,
            max_lr=cfg.lr_find.max_lr,
            num_training=cfg.lr_find.num_training,
            update_attr=False,
        )
    finally:
        module.finetune = strategy
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None:
        log.warning("LR finder gave no suggestion; keeping optimizer.lr=%s", module.hparams.optimizer["lr"])
        return module.hparams.optimizer["lr"]
    base_lr = suggestion / strategy.head_lr_scale
    module.hparams.optimizer["lr"] = base_lr
    log.info("LR finder: head LR %.3g -> optimizer.lr = %.3g", suggestion, base_lr)
    return base_lr


def test_best(
    cfg: DictConfig, trainer: Trainer, module: Classifier, datamodule, loggers: list, best: str
) -> Trainer | None:
    """Test the best checkpoint (the weights in memory after fast_dev_run, which saves none).

    After a multi-process fit, rank zero tests alone on one device: a distributed sampler would pad the
    test set with repeated images and skew the metrics. Returns the Trainer that tested; None on other ranks.
    """
    tester = trainer
    if trainer.world_size > 1:
        # Rank zero's test metrics would otherwise wait to sync with processes that have left.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if not trainer.is_global_zero:
            return None
        continue_csv_logs(loggers)
        tester = instantiate(
            cfg.trainer,
            devices=1,
            num_nodes=1,
            strategy="auto",
            callbacks=[],
            logger=loggers or False,
            enable_checkpointing=False,
        )
    # fast_dev_run saves no checkpoint: then the weights in memory are tested.
    tester.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
    return tester


def keep_earlier_csv_rows(loggers: list) -> None:
    """Lightning's CSVLogger empties metrics.csv when it starts; a run that re-enters its folder (a requeued
    job resuming from last.ckpt) keeps the rows of its earlier attempts instead."""
    if rank_zero_only.rank != 0:
        return
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / "metrics.csv"
            earlier = path.read_text() if path.is_file() else ""
            if earlier:
                logger.experiment  # noqa: B018  (starts the writer, which deletes the file)
                path.write_text(earlier)
                continue_csv_logs([logger])


def continue_csv_logs(loggers: list) -> None:
    """A CSVLogger that did not write the file itself (the main process after ddp_spawn) must know its
    columns, or Lightning's CSV writer fails when it adds the test metrics."""
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            path = Path(logger.experiment.metrics_file_path)
            if path.is_file():
                header = path.read_text().splitlines()[0].split(",")
                logger.experiment.metrics_keys = sorted(set(logger.experiment.metrics_keys) | set(header))


def fit_stats(trainer: Trainer, module: Classifier, fit_seconds: float) -> dict[str, float]:
    """What a run cost: parameters, input size, epochs, wall time of the fit, training images per second."""
    stats = {
        "model/params": sum(p.numel() for p in module.backbone.parameters()),
        "model/trainable_params": sum(p.numel() for p in module.backbone.parameters() if p.requires_grad),
        "model/input_px": module.input_config["input_size"][-1],
        "fit/epochs": trainer.current_epoch,
        "fit/time_s": round(fit_seconds, 2),
    }
    for callback in trainer.callbacks:
        if isinstance(callback, TrainingThroughput) and callback.images_per_second:
            stats["fit/train_img_per_s"] = round(callback.images_per_second, 1)
    return stats


def train(cfg: DictConfig) -> dict[str, float]:
    set_threads(cfg.get("threads"))
    if rank_zero_only.rank != 0:  # the other DDP processes would repeat every line of rank zero's log
        logging.getLogger("skuvision").setLevel(logging.WARNING)
    check_devices(cfg.trainer)
    seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule, module = build(cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    ckpt_path = resume_path(cfg)
    loggers = instantiate_loggers(cfg.get("logger"), resume_from=ckpt_path)
    if not loggers:  # Lightning refuses an LR monitor without a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    strategy = ddp_strategy(cfg.trainer, module)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, strategy=strategy)
    check_launch(trainer, strategy)
    if trainer.world_size > 1:
        log.info(
            "%d processes: batch per process %d (data.batch_size=%d is the global batch)",
            trainer.world_size,
            datamodule.per_process_batch_size(trainer.world_size),
            datamodule.batch_size,
        )
    keep_earlier_csv_rows(loggers)
    try:
        for logger in loggers:
            logger.log_hyperparams({**plain(cfg), "class_names": datamodule.class_names})
        if trainer.is_global_zero:
            write_data_report(datamodule, output_dir)
        if cfg.get("lr_find") and cfg.lr_find.enabled:
            if trainer.world_size > 1:  # every process would sweep on its own and may find another LR
                raise SkuvisionError(
                    "lr_find.enabled=true runs on one device: find the LR with trainer=gpu, then train with "
                    "trainer=ddp optimizer.lr=<the LR it logs>"
                )
            find_lr(cfg, module, datamodule)
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        metrics = {
            **stage_metrics(trainer, "val/"),
            **fit_stats(trainer, module, time.perf_counter() - started),
        }
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.get("test", True):
            tester = test_best(cfg, trainer, module, datamodule, loggers, best)
            if tester is None:
                return metrics  # a non-zero DDP rank: rank zero tests and writes the files
            metrics.update(stage_metrics(tester, "test/"))
        if trainer.is_global_zero:
            write_json(output_dir / "metrics.json", {**metrics, "best_checkpoint": best or None})
        if "test/acc" in metrics:
            log.info("test accuracy %.4f (best checkpoint: %s)", metrics["test/acc"], best or "none")
            print(f"test/acc = {metrics['test/acc']:.4f}   run folder: {output_dir}")
        return metrics
    finally:
        close_loggers(loggers)
