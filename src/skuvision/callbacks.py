"""Callbacks the trainer config adds (conf/callbacks/): training throughput, the weight EMA, the progress
bar; and the Trainer's profiler when none is chosen."""

from __future__ import annotations

import time
from contextlib import nullcontext
from itertools import chain

import torch
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import RichProgressBar, WeightAveraging
from pytorch_lightning.profilers import PassThroughProfiler
from rich.console import Console
from rich.progress import ProgressColumn
from rich.text import Text
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from skuvision.compat import replace_averaging_update
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


def images_in(batch) -> int:
    """Images in a batch as hooks see it (decoded, on the device): the first item of (images, meta)."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(images)


class ImagesPerSecond(ProgressColumn):
    """Images a second since the bar's task began. Rich's own speed column counts batches, and the last
    batch of an epoch or of a catalogue is smaller."""

    def __init__(self, style):
        super().__init__()
        self.style = style

    def render(self, task) -> Text:
        images, seconds = task.fields.get("images", 0), task.elapsed
        return Text(f"{images / seconds:.1f} img/s" if images and seconds else "", style=self.style)


class ProgressBar(RichProgressBar):
    """Rich's progress bar, also showing the step loss the model last logged (its `step_loss`), read on the
    host once per logging interval: Lightning reads a value logged with prog_bar=True at every batch; and
    images a second of the process's own share (on several processes the bar is rank zero's).

    Where stdout is not a terminal (a log file, CI, a batch job) no bar is drawn: one line per validation of
    the fit instead, with the bar's metrics."""

    def __init__(self, *args, console_kwargs: dict | None = None, **kwargs):
        super().__init__(*args, console_kwargs=console_kwargs, **kwargs)
        self._step_loss: tuple[torch.Tensor, float] | None = None
        self.console_options = dict(console_kwargs or {})
        self.on_terminal = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.on_terminal = Console(**self.console_options).is_terminal
        if not self.on_terminal:
            self.disable()

    def enable(self) -> None:
        if self.on_terminal:  # Lightning's LR finder enables the bar again after its sweep
            super().enable()

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if self.on_terminal or not fitting or not trainer.is_global_zero:
            return
        items = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items.items())
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        print(f"epoch {trainer.current_epoch + 1}{total}  {shown}", flush=True)

    def configure_columns(self, trainer) -> list:
        return [*super().configure_columns(trainer), ImagesPerSecond(self.theme.processing_speed)]

    def _count_images(self, task_id, batch) -> None:
        if self.progress is not None and task_id is not None and self.is_enabled:
            task = next(t for t in self.progress.tasks if t.id == task_id)
            self.progress.update(task_id, images=task.fields.get("images", 0) + images_in(batch))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # Each epoch's bar restarts its clock (rich's reset), so its image count restarts too.
        if self.progress is not None and self.train_progress_bar_id is not None and self.is_enabled:
            self.progress.update(self.train_progress_bar_id, images=0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count_images(self.train_progress_bar_id, batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count_images(self.predict_progress_bar_id, batch)
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "step_loss", None)
        if loss is not None:
            if self._step_loss is None or self._step_loss[0] is not loss:
                self._step_loss = (loss, loss.item())
            items["train/loss_step"] = self._step_loss[1]
        return items


def warmed_up_decay(decay: float, updates: int) -> float:
    """The EMA decay after `updates` updates: (1 + n) / (10 + n) until that reaches `decay`, so an average
    over a short run does not stay anchored to the first weights."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightEMA(WeightAveraging):
    """An exponential moving average of the weights (and BatchNorm statistics), through Lightning's weight
    averaging: validation, the saved checkpoints (hence test, eval, predict, embed and export) and the model
    left after fit use the averaged weights, and a resumed fit continues the average.

    `warmup`: the decay grows as (1 + n) / (10 + n) up to `decay` over the first updates.

    The update reads nothing on the host (on a GPU, torch's own waits for the device at every step): the
    count of updates is a Python int here, mirrored in the AveragedModel's `n_averaged` for the checkpoint.
    `average`: that AveragedModel, during fit.
    """

    def __init__(self, decay: float = 0.998, warmup: bool = True, every_n_steps: int = 1):
        if not 0.0 <= decay <= 1.0:
            raise SkuvisionError(f"callbacks.ema.decay={decay} must be in [0, 1], e.g. 0.998")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.every_n_steps = int(every_n_steps)
        super().__init__(use_buffers=True)
        self.updates = 0
        self.average: AveragedModel | None = None
        self._pairs: tuple[list, list, list] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.average = replace_averaging_update(self, self.update_average)
            self.updates, self._pairs = 0, None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self.average is not None:  # whatever count Lightning restored (0 from a checkpoint without one)
            self.updates = int(self.average.n_averaged)

    @torch.no_grad()
    def update_average(self, model: torch.nn.Module) -> None:
        """What torch's AveragedModel.update_parameters does with this decay, from the Python count: the
        first update copies the weights, later ones lerp the float tensors; integer buffers (BatchNorm's step
        counters) are the model's own."""
        if self._pairs is None:  # the same tensors all fit: Lightning swaps and restores values in place
            tensors = zip(
                chain(self.average.module.parameters(), self.average.module.buffers()),
                chain(model.parameters(), model.buffers()),
                strict=True,
            )
            pairs = [(average.detach(), current.detach()) for average, current in tensors]
            floats = [pair for pair in pairs if pair[0].is_floating_point()]
            others = [pair for pair in pairs if not pair[0].is_floating_point()]
            self._pairs = ([a for a, _ in floats], [c for _, c in floats], others)
        averages, currents, others = self._pairs
        if self.updates == 0:
            others = others + list(zip(averages, currents, strict=True))
        elif averages:
            decay = warmed_up_decay(self.decay, self.updates) if self.warmup else self.decay
            get_ema_multi_avg_fn(decay)(averages, currents, None)
        for average, current in others:
            average.copy_(current)
        self.average.n_averaged.add_(1)
        self.updates += 1

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.every_n_steps == 0


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler, which records nothing, without the context manager it still builds
    around every hook call (dozens a step, each a generator): a shared no-op context instead."""

    _nothing = nullcontext()

    def profile(self, action_name: str):
        return self._nothing
