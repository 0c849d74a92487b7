"""Callbacks the tests plug into CLI runs through the config (+callbacks.name._target_=tests.probes.X)."""

import json
from pathlib import Path

from pytorch_lightning import Callback


class FrozenStateProbe(Callback):
    """Writes, per rank, which backbone parameters train in each epoch: frozen_rank<r>.json."""

    def __init__(self):
        self.epochs: dict[int, list[bool]] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs[trainer.current_epoch] = [p.requires_grad for p in pl_module.backbone.parameters()]

    def on_train_end(self, trainer, pl_module):
        out = Path(trainer.default_root_dir) / f"frozen_rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.epochs))


class InterruptJob(Callback):
    """Kills the whole sweep process (as a power cut or scancel would) when job `job` starts training."""

    def __init__(self, job: int):
        self.job = job

    def on_train_start(self, trainer, pl_module):
        import os
        import signal

        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().job.num == self.job:
            os.kill(os.getpid(), signal.SIGKILL)


class FailJob(Callback):
    """Raises in job `job`, as an out-of-memory error would."""

    def __init__(self, job: int):
        self.job = job

    def on_train_start(self, trainer, pl_module):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().job.num == self.job:
            raise RuntimeError("CUDA out of memory (simulated by probes.FailJob)")


class SeenLabels(Callback):
    """Writes, per rank, the labels of every training batch of every epoch: seen_rank<r>.json."""

    def __init__(self):
        self.epochs: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).append(batch[1].tolist())

    def on_train_end(self, trainer, pl_module):
        out = Path(trainer.default_root_dir) / f"seen_rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.epochs))


class KillAtStep(Callback):
    """Saves a checkpoint after optimizer step `step` and fails the run there, as a preempted job would."""

    def __init__(self, step: int, path: str):
        self.step = step
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise RuntimeError(f"killed after step {self.step}")
