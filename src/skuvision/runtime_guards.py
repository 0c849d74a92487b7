"""Runtime guards and workarounds around Lightning and torch: what a run needs beyond its assembly.

- Guards: settings that would fail late or hang (GPUs that are not there, `ddp` inside a multirun,
  several nodes without a cluster), DDP's unused-parameter switch for frozen stages, resuming a re-entered
  run folder.
- Workarounds, each for a behaviour of the version named beside it, with a test in
  tests/test_runtime_guards.py that fails when that behaviour changes:
  - Lightning's CSV logger empties metrics.csv when its writer starts, and a writer that did not write the
    file fails when it adds columns to it (pytorch-lightning 2.6.6);
  - the test after a fit runs on a Trainer of its own: alone on rank zero (a distributed test pads the test
    set), and without the weight-averaging callback (which would load the raw weights; 2.6.6);
  - torch names no public check for native bf16 on the CPU (torch 2.14.1:
    `torch.cpu._is_avx512_bf16_supported`, `torch.cpu._is_amx_tile_supported`, in `cpu_has_native_bf16`);
  - a Gradio page mounted with `gr.mount_gradio_app` is never marked as launched, so Gradio skips its path
    checks on file payloads, and nothing ends its pages' heartbeat streams on shutdown (gradio 6.31.0:
    `Blocks.has_launched`, `App.stop_event`, in `check_file_payloads` and `end_page_streams`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import StrategyRegistry
from pytorch_lightning.utilities import rank_zero_only

from skuvision.checkpoints import read_checkpoint
from skuvision.config import in_multirun
from skuvision.errors import SkuvisionError
from skuvision.finetune import stage_param_names

log = logging.getLogger("skuvision")

# Private torch helpers (torch 2.14.1) that tell whether the CPU runs bf16 natively.
NATIVE_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast about doubles training speed there, and is emulated (slower than
    float32) elsewhere."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in NATIVE_BF16_CHECKS)


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
    """`ckpt_path` when given; else the run folder's last.ckpt when there is one, which happens only when a
    run re-enters its folder: a SLURM job requeued after a timeout or preemption resumes where it stopped.
    Either is checked by the checkpoint reader first: a file planted in the run folder has no other way in."""
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path)
        return str(cfg.ckpt_path)
    last = (cfg.get("callbacks") or {}).get("last_checkpoint")
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
    return instantiate(
        cfg.trainer,
        devices=1,
        num_nodes=1,
        strategy="auto",
        callbacks=[],
        logger=loggers or False,
        enable_checkpointing=False,
    )


def keep_earlier_csv_rows(loggers: list) -> None:
    """The CSV writer deletes metrics.csv when it starts; a run that re-enters its folder (a requeued job
    resuming from last.ckpt) keeps the rows of its earlier attempts instead."""
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
    """A CSV writer that did not write metrics.csv itself (the main process after ddp_spawn, a resumed run)
    must know the file's columns, or it fails when it adds new ones (the test metrics)."""
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            path = Path(logger.experiment.metrics_file_path)
            if path.is_file():
                header = path.read_text().splitlines()[0].split(",")
                logger.experiment.metrics_keys = sorted(set(logger.experiment.metrics_keys) | set(header))


# LitServe names its HTTP server processes LitServer-<n> (checked against litserve 0.2.19; the SIGTERM test
# in tests/test_serve.py fails if that changes): tasks.serve drains them on SIGTERM.
LITSERVE_API_PROCESS = "LitServer-"


def use_boto3_for_plain_http() -> None:
    """litdata's obstore client refuses plain-http endpoints (an on-premises S3 such as MinIO, or an emulator
    on 127.0.0.1); with AWS_ENDPOINT_URL=http://... litdata is switched to its boto3 client.

    `_OBSTORE_AVAILABLE` is private to litdata (checked with litdata 0.2.76; tests/test_streaming.py
    notices a change). Called at import, so litdata's spawned workers, which import this module to unpickle
    what they run, take the same client.
    """
    if not os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        return
    import litdata.streaming.downloader as downloader

    if downloader._OBSTORE_AVAILABLE:
        log.info("AWS_ENDPOINT_URL is plain http: litdata reads and writes it through boto3")
        downloader._OBSTORE_AVAILABLE = False


def check_file_payloads(blocks) -> None:
    """Make Gradio check every file payload sent to a mounted page's event API as it does for a launched one:
    only files uploaded through the page pass (blocked_paths first), before anything is copied.

    Gradio reads `Blocks.has_launched` for this, and only `launch()` sets it (gradio 6.31.0,
    processing_utils._check_allowed); without it a FileData naming any readable file is copied into the
    page's cache and served. tests/test_runtime_guards.py notices a change."""
    blocks.has_launched = True


def end_page_streams(gradio_app, loop: asyncio.AbstractEventLoop) -> None:
    """End the heartbeat stream each open page of a mounted Gradio app holds, so a graceful shutdown does not
    wait out uvicorn's timeout for them. Gradio ends them on `App.stop_event`, which only its own server sets
    (gradio 6.31.0). Safe in a signal handler: the event is set on the app's event loop `loop`."""
    loop.call_soon_threadsafe(gradio_app.stop_event.set)
