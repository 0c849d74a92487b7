"""What Lightning's DDP SIGTERM broadcast costs a step (pytorch-lightning >= 2.5.2, its issue #21487):
the default recipe (simple_cnn at 28 px, weight EMA on) on trainer=ddp_cpu with 2 processes, counted with
skuvision.host_reads and timed per step, as Lightning runs it and with the broadcast taken out. Not part of
`make bench` (two DDP runs); its figures are in bench/results.md's notes.

    PYTHONPATH=src python -m bench.ddp_sigterm [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from pytorch_lightning import Callback

from bench.run import overrides_for
from skuvision.assembly import build, build_trainer, instantiate_callbacks, instantiate_loggers
from skuvision.config import compose_config
from skuvision.host_reads import counting_host_reads
from tests.writers import write_fashion_mnist

WARMUP = 10


class StepProbe(Callback):
    """In each spawned process: the host reads inside Lightning's broadcast (counted there only: counting
    every read formats a stack each time and would slow the step) and the time between step starts; rank
    zero writes them to `out`. `broadcast=False` takes the broadcast out."""

    def __init__(self, out: Path, broadcast: bool):
        self.out, self.broadcast = str(out), broadcast

    def setup(self, trainer, pl_module, stage):
        loop = type(trainer.fit_loop.epoch_loop)
        original = loop._broadcast_sigterm_tensor
        self.calls, self.reads, self.starts = 0, 0, []

        def counted(epoch_loop):
            self.calls += 1
            with counting_host_reads() as reads:
                original(epoch_loop)
            self.reads += reads.count(None)

        loop._broadcast_sigterm_tensor = counted if self.broadcast else (lambda epoch_loop: None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            gaps = [b - a for a, b in zip(self.starts[WARMUP:], self.starts[WARMUP + 1 :], strict=False)]
            result = {
                "ms_per_step": round(1e3 * statistics.median(gaps), 2),
                "steps": len(gaps),
                "broadcasts": self.calls,
                "reads_in_broadcasts": self.reads,
            }
            Path(self.out).write_text(json.dumps(result))


def run(data_root: Path, steps: int, broadcast: bool, workdir: Path) -> dict:
    out = workdir / f"probe-{broadcast}-{time.time_ns()}.json"
    overrides = overrides_for("simple_cnn", 28, data_root, "cpu") + [
        "trainer=ddp_cpu",
        "trainer.devices=2",
        f"trainer.limit_train_batches={steps + WARMUP}",
        "data.num_workers=0",
        "data.batch_size=16",  # 8 per process
    ]
    cfg = compose_config("train", overrides, workdir / f"run-{time.time_ns()}")
    datamodule, module = build(cfg)
    callbacks = instantiate_callbacks(cfg.callbacks) + [StepProbe(out, broadcast)]
    trainer = build_trainer(cfg, instantiate_loggers(cfg.logger), callbacks)
    trainer.fit(module, datamodule=datamodule)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_fashion_mnist(Path(tmp) / "fashion", n_train=2400, n_test=100)  # 150 steps an epoch
        for broadcast in (True, False, True, False):
            result = run(data, args.steps, broadcast, Path(tmp))
            print(json.dumps({"broadcast": broadcast, **result}), flush=True)


if __name__ == "__main__":
    main()
