"""Counting the host's reads of tensor values: `.item()`, `bool()`, `float()`, `int()`, `.tolist()`, `.cpu()`,
`.numpy()` and `__index__`, called from Python. On a GPU each one waits for the device, so the CPU's work of
the next step stops overlapping with the GPU's. tests/test_host_reads.py holds the training step to none
between logging intervals; `make bench` reports the count per step. Imports nothing of skuvision.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from pytorch_lightning import Callback

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@dataclass(repr=False)
class HostReads:
    """The reads seen while counting, each as (method, a short stack), grouped under the current `mark`."""

    stack_depth: int = 6
    mark: object = None
    reads: dict = field(default_factory=dict)

    def record(self, method: str) -> None:
        # The innermost frames are this module's wrapper: drop them, keep the callers.
        frames = traceback.format_stack(limit=self.stack_depth + 2)[:-2]
        self.reads.setdefault(self.mark, []).append((method, "".join(frames)))

    def __repr__(self) -> str:
        return f"HostReads({ {mark: len(reads) for mark, reads in self.reads.items()} })"

    def count(self, mark: object) -> int:
        return len(self.reads.get(mark, []))

    def describe(self, mark: object, limit: int = 3) -> str:
        """The first `limit` reads under `mark`, with where they came from: a failing test's message."""
        reads = self.reads.get(mark, [])
        shown = [f"Tensor.{method} from\n{stack}" for method, stack in reads[:limit]]
        return f"{len(reads)} host read(s) at {mark!r}:\n" + "\n".join(shown)


@contextmanager
def counting_host_reads(stack_depth: int = 6) -> Iterator[HostReads]:
    """Within the block, every Python-level read of a tensor's value (on any device) is recorded."""
    reads = HostReads(stack_depth=stack_depth)
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    own = {name for name in READS if name in vars(torch.Tensor)}  # the others are TensorBase's

    def counted(name, original):
        @functools.wraps(original)
        def read(self, *args, **kwargs):
            reads.record(name)
            return original(self, *args, **kwargs)

        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(name, original))
        yield reads
    finally:
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)


class ReadsPerStep(Callback):
    """Groups the reads by training step (`trainer.global_step` at its start): from a step's start to the
    next one's, so the callbacks after the step (the weight EMA's update among them) and the loading of the
    next batch count with it. Reads from validation on are grouped under "after the steps"."""

    def __init__(self, reads: HostReads):
        self.reads = reads
        self.steps: list[int] = []
        self.last_of_epochs: list[int] = []
        self.log_every_n_steps = 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.reads.mark = trainer.global_step
        self.log_every_n_steps = trainer.log_every_n_steps
        self.steps.append(trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.reads.mark = "after the steps"

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.reads.mark = "after the steps"
        if self.steps:
            self.last_of_epochs.append(self.steps[-1])

    def quiet_steps(self) -> list[int]:
        """The steps that log nothing: with n = trainer.log_every_n_steps, the step loss is logged at steps
        k % n == 0, Lightning writes its logs at steps (k + 1) % n == 0, and an epoch's last step runs into
        the epoch's end (validation)."""
        n = self.log_every_n_steps
        return [k for k in self.steps if k % n not in (0, n - 1) and k not in self.last_of_epochs]
