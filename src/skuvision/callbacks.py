"""Callbacks the trainer config adds (conf/callbacks/): training throughput, and the weight EMA."""

from __future__ import annotations

import time

import torch
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import WeightAveraging

from skuvision.errors import SkuvisionError


class TrainingThroughput(Callback):
    """Training images per second over the whole fit, validation excluded: the cost column of a leaderboard.

    Time runs from each training epoch's start to its validation (or its end), so data loading counts and
    evaluation does not. Every rank sees its own share of each batch, so the figure is scaled by world size.
    """

    def __init__(self):
        self.images = 0
        self.seconds = 0.0
        self._started: float | None = None

    @property
    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def _stop(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += len(batch[0]) * trainer.world_size

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._stop()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()


def warmed_up_decay(decay: float, updates):
    """The EMA decay after `updates` updates: (1 + n) / (10 + n) until that reaches `decay`, so an average
    over a short run does not stay anchored to the first weights. A tensor `updates` gives a tensor, computed
    where it lives (reading a GPU counter on the host would wait for the device every step)."""
    if isinstance(updates, torch.Tensor):
        return torch.clamp((1 + updates) / (10 + updates), max=decay)
    return min(decay, (1 + updates) / (10 + updates))


class WeightEMA(WeightAveraging):
    """An exponential moving average of the weights (and BatchNorm statistics), through Lightning's weight
    averaging: validation, the saved checkpoints (hence test, eval, predict, embed and export) and the model
    left after fit use the averaged weights, and a resumed fit continues the average.

    `warmup`: the decay grows as (1 + n) / (10 + n) up to `decay` over the first updates.
    """

    def __init__(self, decay: float = 0.998, warmup: bool = True, every_n_steps: int = 1):
        if not 0.0 <= decay <= 1.0:
            raise SkuvisionError(f"callbacks.ema.decay={decay} must be in [0, 1], e.g. 0.998")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.every_n_steps = int(every_n_steps)
        super().__init__(use_buffers=True, multi_avg_fn=self.update_averages)

    @torch.no_grad()
    def update_averages(self, averages: list, currents: list, num_averaged: torch.Tensor) -> None:
        """One update of a group of tensors of one device and dtype (torch's AveragedModel groups them)."""
        if not averages[0].is_floating_point():  # BatchNorm's step counters: the model's own
            for average, current in zip(averages, currents, strict=True):
                average.copy_(current)
            return
        decay = warmed_up_decay(self.decay, num_averaged.to(averages[0].dtype)) if self.warmup else self.decay
        weight = 1.0 - decay
        for average, current in zip(averages, currents, strict=True):
            average.lerp_(current, weight)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.every_n_steps == 0
