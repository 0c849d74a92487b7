"""Callbacks the trainer config adds (conf/callbacks/)."""

from __future__ import annotations

import time

from pytorch_lightning import Callback


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
