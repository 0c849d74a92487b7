"""train(cfg): input config -> data + Classifier -> fit -> test of the best checkpoint -> metrics.json.

The assembly is `skuvision.assembly`; what guards the run against hangs and late failures is in
`tasks.launch`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig
from pytorch_lightning import LightningDataModule, Trainer, seed_everything
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities import rank_zero_only

from skuvision.assembly import (
    build,
    build_trainer,
    check_trainer_keys,
    close_loggers,
    instantiate_callbacks,
    instantiate_loggers,
)
from skuvision.callbacks import TrainingThroughput
from skuvision.compat import keep_earlier_csv_rows
from skuvision.config import plain, set_threads
from skuvision.errors import SkuvisionError
from skuvision.finetune import LinearProbe
from skuvision.models.classifier import Classifier
from skuvision.tasks.launch import (
    check_devices,
    check_launch,
    check_val_split,
    checkpoint_to_test,
    ddp_strategy,
    resume_path,
    test_checkpoint,
)
from skuvision.tasks.utils import command, print_summary, shown, stage_metrics, write_data_report, write_json

log = logging.getLogger("skuvision")


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
    tuner_trainer = build_trainer(
        cfg, enable_checkpointing=False, default_root_dir=str(Path(cfg.paths.output_dir) / "lr_find")
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


def train_summary(output_dir: Path, metrics: dict, tested: str | None, best: str | None) -> str:
    """Its checkpoints and the commands that take them: the run folder where metrics.json records the tested
    checkpoint (which ckpt_path= resolves to), else the checkpoint file itself."""
    ckpts = [Path(p) for p in dict.fromkeys(filter(None, (tested, best)))]
    last = output_dir / "checkpoints" / "last.ckpt"
    wrote = [output_dir / "metrics.json", *ckpts, *([last] if last.is_file() and last not in ckpts else [])]
    figures = {k: f"{metrics[k]:.4f}" for k in ("test/acc", "val/acc") if k in metrics}
    if not ckpts and not last.is_file():  # callbacks without a checkpoint: nothing for the next tasks
        return print_summary("train", wrote[:1], figures)
    given = shown(output_dir) if tested else shown(ckpts[0] if ckpts else last)
    return print_summary(
        "train",
        wrote,
        figures,
        [
            command("eval.py", f"ckpt_path={given}"),
            command("predict.py", f"ckpt_path={given}", "input=<photos>"),
            command("serve.py", f"ckpt_path={given}"),
        ],
    )


def train(cfg: DictConfig) -> dict[str, float]:
    set_threads(cfg.get("threads"))
    if rank_zero_only.rank != 0:  # the other DDP processes would repeat every line of rank zero's log
        logging.getLogger("skuvision").setLevel(logging.WARNING)
    check_devices(cfg.trainer)
    check_trainer_keys(cfg.trainer)  # before the data and model are built
    seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_path(cfg)
    datamodule, module = build(cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), resume_from=ckpt_path)
    if not loggers:  # Lightning refuses an LR monitor without a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    strategy = ddp_strategy(cfg.trainer, module.finetune, module.backbone)
    trainer = build_trainer(cfg, loggers, callbacks, strategy=strategy)
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
        if trainer.is_global_zero:
            train_summary(output_dir, metrics, tested, best)
        return metrics
    finally:
        close_loggers(loggers)
