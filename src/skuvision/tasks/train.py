"""train(cfg): input config -> data + Classifier -> fit -> test of the best checkpoint -> metrics.json.

The assembly is `tasks.assembly.build`; what guards the run against hangs and late failures is in
`skuvision.runtime_guards`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning import LightningDataModule, Trainer, seed_everything
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities import rank_zero_only

from skuvision.callbacks import TrainingThroughput
from skuvision.checkpoints import read_checkpoint
from skuvision.errors import SkuvisionError
from skuvision.finetune import LinearProbe
from skuvision.models.classifier import Classifier
from skuvision.runtime_guards import (
    check_devices,
    check_launch,
    ddp_strategy,
    keep_earlier_csv_rows,
    resume_path,
    solo_tester,
)
from skuvision.tasks.assembly import build
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


def write_data_report(datamodule: LightningDataModule, output_dir: Path) -> None:
    """class_counts.json per split, and skipped_images.json when unreadable images were left out."""
    report = datamodule.data_report()
    write_json(output_dir / "class_counts.json", report["class_counts"])
    skipped = report["skipped"]
    if skipped:
        write_json(output_dir / "skipped_images.json", skipped)
        log.warning(
            "%d unreadable image(s) skipped: listed in %s", len(skipped), output_dir / "skipped_images.json"
        )


def check_val_split(datamodule: LightningDataModule, trainer: Trainer) -> None:
    """Early stopping and the best checkpoint watch val metrics; with an empty val split Lightning would stop
    after the first epoch with a traceback (fast_dev_run switches both off)."""
    if trainer.fast_dev_run:
        return
    monitors = {getattr(c, "monitor", None) for c in trainer.callbacks}
    watched = sorted(m for m in monitors if isinstance(m, str) and m.startswith("val/"))
    counts = datamodule.class_counts()
    if watched and sum(counts.get("val", [])) == 0:
        raise SkuvisionError(
            f"the val split is empty ({sum(counts.get('train', []))} training images) but early stopping and "
            f"the best checkpoint watch {', '.join(watched)}: add images, or give val a share "
            "(data.val_fraction; data.split_fractions for image folders and manifests)"
        )


def checkpoint_to_test(cfg: DictConfig, trainer: Trainer) -> str:
    """The checkpoint `test_ckpt` names: best (highest val/acc; a tie keeps the earlier epoch) or last (the
    every-epoch checkpoint, as the fit ended). "" when the run saved none (fast_dev_run): the weights in
    memory. Called before the fit too, so a config that cannot give it fails at once."""
    choice = cfg.get("test_ckpt", "best")
    if choice not in ("best", "last"):
        raise SkuvisionError(f"test_ckpt={choice}: choose best (highest val/acc) or last (as the fit ended)")
    if choice == "best":
        return trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    every_epoch = [c for c in trainer.checkpoint_callbacks if c.monitor is None]
    if trainer.checkpoint_callbacks and not every_epoch:
        raise SkuvisionError(
            "test_ckpt=last needs a checkpoint saved every epoch (callbacks.last_checkpoint): add it back, "
            "or test the best with test_ckpt=best"
        )
    if not every_epoch:
        return ""
    saved = every_epoch[0]
    if saved.best_model_path:
        return saved.best_model_path
    # ddp_spawn hands only the first checkpoint callback's path back to the main process: the file is where
    # the callback's own naming puts it (a fixed name such as "last"; a templated one is not found)
    named = saved.format_checkpoint_name({}) if saved.dirpath else ""
    return named if named and Path(named).is_file() else ""


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


def test_checkpoint(
    cfg: DictConfig, trainer: Trainer, module: Classifier, datamodule, loggers: list, checkpoint: str
) -> Trainer | None:
    """Test `checkpoint` (the weights in memory after fast_dev_run, which saves none) on one process.
    Returns the Trainer that tested; None on the other ranks of a multi-process run."""
    tester = solo_tester(cfg, trainer, loggers)
    if tester is not None:
        if checkpoint:
            read_checkpoint(checkpoint, key="test_ckpt")
        tester.test(module, datamodule=datamodule, ckpt_path=checkpoint or None, weights_only=True)
    return tester


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
    ckpt_path = resume_path(cfg)
    datamodule, module = build(cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), resume_from=ckpt_path)
    if not loggers:  # Lightning refuses an LR monitor without a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    strategy = ddp_strategy(cfg.trainer, module.finetune, module.backbone)
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
    check_val_split(datamodule, trainer)
    checkpoint_to_test(cfg, trainer)  # refuses a test_ckpt the callbacks cannot give before the fit starts
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
        # resume_path read ckpt_path through the checked reader; Lightning loads it again, weights only
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = {
            **stage_metrics(trainer, "val/"),
            **fit_stats(trainer, module, time.perf_counter() - started),
        }
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        tested = checkpoint_to_test(cfg, trainer)
        if cfg.get("test", True):
            test_started = time.perf_counter()
            tester = test_checkpoint(cfg, trainer, module, datamodule, loggers, tested)
            if tester is None:
                return metrics  # a non-zero DDP rank: rank zero tests and writes the files
            metrics.update(stage_metrics(tester, "test/"))
            metrics["test/time_s"] = round(time.perf_counter() - test_started, 2)
        if trainer.is_global_zero:
            record = {**metrics, "checkpoint": tested or None, "best_checkpoint": best or None}
            record["tta"] = module.tta
            write_json(output_dir / "metrics.json", record)
        if "test/acc" in metrics:
            log.info("test accuracy %.4f (checkpoint: %s)", metrics["test/acc"], tested or "none")
            print(f"test/acc = {metrics['test/acc']:.4f}   run folder: {output_dir}")
        return metrics
    finally:
        close_loggers(loggers)
