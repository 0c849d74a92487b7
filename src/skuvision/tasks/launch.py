"""What a training run checks before and around its fit: devices that are not there, launches that would
hang, DDP's unused-parameter switch for frozen stages, resuming a re-entered run folder, the val split and the
checkpoint the test will use, and the one-device tester after the fit."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.strategies import StrategyRegistry

from skuvision.assembly import build_trainer
from skuvision.checkpoints import read_checkpoint, resume_file
from skuvision.compat import continue_csv_logs, testing_after_fit
from skuvision.config import in_multirun
from skuvision.errors import SkuvisionError
from skuvision.finetune import stage_param_names

log = logging.getLogger("skuvision")


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


def ddp_strategy(trainer_cfg: DictConfig, finetune, backbone) -> str:
    """DDP must be told when parameters go unused (frozen stages get no gradient), or it raises.

    Unused-parameter detection costs a graph traversal per step, so it is switched on only for strategies
    that freeze something during the run.
    """
    strategy = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, str) or not strategy.startswith("ddp") or "find_unused" in strategy:
        return strategy
    num_stages = len(stage_param_names(backbone))
    epochs = range(max(1, int(trainer_cfg.get("max_epochs") or 1)))
    if any(finetune.frozen_stages(epoch, num_stages) for epoch in epochs):
        log.info("%s with frozen stages: using %s_find_unused_parameters_true", strategy, strategy)
        return f"{strategy}_find_unused_parameters_true"
    return strategy


def started_by_cluster(trainer: Trainer) -> bool:
    """Whether a cluster (SLURM, torchrun) started this run's processes; single-device runs have none."""
    cluster = getattr(trainer.strategy, "cluster_environment", None)
    return bool(cluster and cluster.creates_processes_externally)


def reruns_command_line(trainer: Trainer, strategy: str) -> bool:
    """Whether Lightning starts the other processes by re-running this command (its `popen` start method),
    rather than spawning them or finding them started by a cluster."""
    registered = StrategyRegistry[strategy]["init_params"] if strategy in StrategyRegistry else {}
    return registered.get("start_method") == "popen" and not started_by_cluster(trainer)


def check_launch(trainer: Trainer, strategy) -> None:
    """Launches that would hang. In a multirun the re-run command line would be the whole sweep (or
    submitit's runner), so the processes never meet."""
    if in_multirun() and isinstance(strategy, str) and reruns_command_line(trainer, strategy):
        raise SkuvisionError(
            f"trainer.strategy={strategy} cannot run inside a multirun (-m): use "
            "trainer=ddp_spawn (or trainer.strategy=ddp_spawn), or hydra/launcher=slurm on a SLURM cluster"
        )
    # Without a cluster (SLURM, torchrun) or MASTER_ADDR, rank zero would wait forever for the other nodes.
    if trainer.num_nodes > 1 and not started_by_cluster(trainer) and "MASTER_ADDR" not in os.environ:
        raise SkuvisionError(
            f"trainer.num_nodes={trainer.num_nodes} needs its nodes started together: submit with "
            "hydra/launcher=slurm, or set MASTER_ADDR, MASTER_PORT and NODE_RANK on every node"
        )


def resume_path(cfg: DictConfig) -> str | None:
    """`ckpt_path` when given (a run folder: its last.ckpt, where it stopped); else this run folder's
    last.ckpt when there is one, which happens only when a run re-enters its folder: a SLURM job requeued
    after a timeout or preemption resumes where it stopped. Either is checked by the checkpoint reader
    first: a file planted in the run folder has no other way in."""
    last = (cfg.get("callbacks") or {}).get("last_checkpoint")
    if cfg.get("ckpt_path"):
        given = resume_file(cfg.ckpt_path, f"{last.filename}.ckpt" if last is not None else "last.ckpt")
        read_checkpoint(given)
        return str(given)
    if last is None:
        return None
    path = Path(last.dirpath) / f"{last.filename}.ckpt"
    if not path.is_file():
        return None
    try:
        read_checkpoint(path, label=f"{path} (this run folder's last checkpoint, which a rerun resumes from)")
    except SkuvisionError as err:
        raise SkuvisionError(f"{err}. To start this run afresh, move that file away") from err
    log.info("resuming from %s, left by an earlier attempt of this run", path)
    return str(path)


def solo_tester(cfg: DictConfig, trainer: Trainer, loggers: list) -> Trainer | None:
    """A one-device Trainer without the fit's callbacks that tests after the fit, on rank zero (None on the
    other ranks).

    One device: after a multi-process fit a distributed sampler would pad the test set with repeated images
    and skew the metrics. No fit callbacks: Lightning's weight averaging, handed a checkpoint while it holds
    an average, loads the raw weights into the model (pytorch-lightning 2.6.6), and the test must see the
    checkpoint's averaged ones.
    """
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        # Rank zero's test metrics would otherwise wait to sync with processes that have left.
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return None
    continue_csv_logs(loggers)
    return build_trainer(cfg, loggers, devices=1, num_nodes=1, strategy="auto", enable_checkpointing=False)


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


def test_checkpoint(
    cfg: DictConfig, trainer: Trainer, module: LightningModule, datamodule, loggers: list, checkpoint: str
) -> Trainer | None:
    """Test `checkpoint` (the weights in memory after fast_dev_run, which saves none) on one process.
    Returns the Trainer that tested; None on the other ranks of a multi-process run."""
    tester = solo_tester(cfg, trainer, loggers)
    if tester is not None:
        if checkpoint:
            read_checkpoint(checkpoint, key="test_ckpt")
        with testing_after_fit():
            tester.test(module, datamodule=datamodule, ckpt_path=checkpoint or None, weights_only=True)
    return tester
