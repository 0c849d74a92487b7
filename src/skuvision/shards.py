"""Trainer.predict over a whole catalogue in shards: each process writes what it computed as Parquet files in
the run folder's shards/, and a rerun into that folder skips what they hold.

Every image of the input has a position (its row in input order), carried in the sample beside its read
error (data.inputs.InputFilesDataModule with `positions`), never inferred from batch order. Lightning splits
the positions among the processes with its UnrepeatedDistributedSampler (no padded duplicates). A process
writes a shard whenever `shard_size` images have gathered, and the rest at the end: columns `index` (the
position), `error`, and the model's float32 outputs, one fixed-size list column per output (`out`, or
`out/<column>` for a model with several heads). Each shard is written under a temporary name and then named
`<first position>-rank<r>.parquet` (skuvision.outputs.new_file), so a killed run leaves only complete shards.

plan.json beside them records what decides the outputs (checkpoint, TTA, precision, the input list); a rerun
with another plan is refused instead of mixing results. `merge` reads every shard back in input order and
checks that each position is there exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pytorch_lightning import Callback

from skuvision.errors import SkuvisionError
from skuvision.outputs import new_file, write_new_json

log = logging.getLogger("skuvision")

FOLDER = "shards"
PLAN = "plan.json"
# Tests only: a process stops (as if killed) after writing this many shards.
STOP_AFTER = "SKUVISION_TEST_STOP_AFTER_SHARDS"


def plan_of(task: str, ckpt_path, items: list[str], **settings) -> dict:
    """What decides the shards' content: a rerun into the same run folder must have the same plan."""
    ckpt = Path(ckpt_path)
    listing = hashlib.sha256("\n".join(items).encode()).hexdigest()
    return {
        "task": task,
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_bytes": ckpt.stat().st_size,
        "items": len(items),
        "items_sha256": listing,
        **settings,
    }


def shard_files(folder: Path) -> list[Path]:
    """The complete shards in `folder` (a partial one of a killed run has a hidden name)."""
    return sorted(p for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))


def check_plan(folder: Path, plan: dict) -> None:
    """Refuse to add to shards of another plan (another checkpoint, input list or setting)."""
    written = Path(folder) / PLAN
    if not written.is_file():
        return
    earlier = json.loads(written.read_text())
    changed = sorted(k for k in set(plan) | set(earlier) if plan.get(k) != earlier.get(k))
    if changed:
        raise SkuvisionError(
            f"{folder} holds shards of another run ({', '.join(changed)} differ): rerun the same command to "
            "resume it, or leave hydra.run.dir at its default for a new run"
        )


def done_positions(folder: Path) -> np.ndarray:
    """Positions that complete shards already hold."""
    found = [pq.read_table(f, columns=["index"]).column("index").to_numpy() for f in shard_files(folder)]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def positions_left(folder: Path, total: int, processes: int) -> list[int]:
    """The input positions no complete shard holds yet, in order; refused where some processes would get
    none (Lightning's sampler needs at least one image per process)."""
    done = np.zeros(total, dtype=bool)
    done[done_positions(folder)] = True
    left = np.flatnonzero(~done).tolist()
    if 0 < len(left) < processes:
        raise SkuvisionError(
            f"{len(left)} image(s) left for {processes} processes: finish with fewer processes "
            f"(trainer.devices={len(left)} trainer.num_nodes=1), or with trainer=cpu"
        )
    if total > len(left):
        log.info(
            "%d of %d image(s) already in %s: predicting the other %d",
            total - len(left),
            total,
            folder,
            len(left),
        )
    return left


def as_columns(outputs) -> dict[str, np.ndarray]:
    """The model's outputs of a batch as float32 arrays named by column."""
    if isinstance(outputs, dict):
        return {f"out/{k}": v.detach().float().cpu().numpy() for k, v in outputs.items()}
    return {"out": outputs.detach().float().cpu().numpy()}


def write_shard(folder: Path, rank: int, index: np.ndarray, errors: list[str], outputs: dict) -> Path:
    columns = {"index": pa.array(index, type=pa.int64()), "error": pa.array(errors, type=pa.string())}
    for name, values in outputs.items():
        flat = pa.array(values.reshape(-1), type=pa.float32())
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    path = Path(folder) / f"{int(index[0]):010d}-rank{rank}.parquet"
    with new_file(path) as partial:
        pq.write_table(pa.table(columns), partial)
    return path


class ShardWriter(Callback):
    """Writes each process's predict outputs in shards of `shard_size` images (see the module's doc), and
    waits at the end until every process has written its last one. Rank zero logs images/s."""

    def __init__(self, folder: Path, shard_size: int, plan: dict):
        if shard_size < 1:
            raise SkuvisionError(f"shard_size={shard_size}: give a number of images of at least 1")
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.plan = plan
        self.stop_after = int(os.environ.get(STOP_AFTER, "0"))

    def on_predict_start(self, trainer, pl_module) -> None:
        self.buffer: list[tuple] = []
        self.buffered = self.images = self.written = 0
        self.started = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero and not (self.folder / PLAN).exists():
            write_new_json(self.folder / PLAN, self.plan)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        meta = outputs["meta"]
        index = meta["index"].cpu().numpy()
        self.buffer.append((index, list(meta["error"]), as_columns(outputs["outputs"])))
        self.buffered += len(index)
        if self.buffered >= self.shard_size:
            self.flush(trainer)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.flush(trainer)
        trainer.strategy.barrier("skuvision_shards")

    def flush(self, trainer) -> None:
        if not self.buffer:
            return
        index = np.concatenate([b[0] for b in self.buffer])
        errors = [e for b in self.buffer for e in b[1]]
        outputs = {k: np.concatenate([b[2][k] for b in self.buffer]) for k in self.buffer[0][2]}
        path = write_shard(self.folder, trainer.global_rank, index, errors, outputs)
        self.images += len(index)
        self.buffer, self.buffered, self.written = [], 0, self.written + 1
        if trainer.is_global_zero:
            rate = self.images / max(time.perf_counter() - self.started, 1e-9)
            line = (
                f"{path.name}: {len(index)} image(s); rank 0 at {rate:.1f} images/s, about "
                f"{rate * trainer.world_size:.1f} images/s on {trainer.world_size} process(es)"
            )
            log.info(line)
            if not log.hasHandlers():  # a process ddp_spawn started: Hydra's logging is not set up there
                print(line, file=sys.stderr, flush=True)
        if self.stop_after and self.written >= self.stop_after:
            raise RuntimeError(f"stopped after {self.written} shard(s) ({STOP_AFTER})")


def merge(folder: Path, total: int) -> tuple[object, list[str]]:
    """Every shard in input order: (the outputs as one float32 tensor, or {column: tensor} for several
    heads; each image's read error), checked to hold each position of the `total` exactly once."""
    table = pa.concat_tables([pq.read_table(f) for f in shard_files(folder)])
    index = table.column("index").to_numpy()
    counts = np.bincount(index, minlength=total) if len(index) else np.zeros(total, dtype=np.int64)
    if len(counts) > total or (counts != 1).any():
        twice = np.flatnonzero(counts > 1)[:5].tolist()
        missing = np.flatnonzero(counts[:total] == 0)[:5].tolist()
        raise SkuvisionError(
            f"{folder}: the shards do not hold each of the {total} images once (twice: {twice}, missing: "
            f"{missing}, ...): move the folder away and run again"
        )
    order = np.argsort(index, kind="stable")
    table = table.take(pa.array(order))
    errors = table.column("error").to_pylist()
    outputs = {}
    for name in table.column_names:
        if name.startswith("out"):
            lists = table.column(name).combine_chunks()
            values = lists.flatten().to_numpy(zero_copy_only=False).reshape(len(lists), -1)
            outputs[name] = torch.from_numpy(values.copy())
    if list(outputs) == ["out"]:
        return outputs["out"], errors
    return {name.removeprefix("out/"): v for name, v in outputs.items()}, errors


def sharded(cfg, trainer) -> bool:
    """`shards`: null writes shards when several processes run (or SLURM requeues one), true always."""
    choice = cfg.get("shards")
    return trainer.world_size > 1 if choice is None else bool(choice)


def predict_in_shards(cfg, trainer, module, paths: list[Path], plan: dict):
    """Trainer.predict over the input files no shard of this run folder holds yet, written in shards; then,
    on rank zero, every shard merged in input order: (outputs, errors). None on the other ranks."""
    from skuvision.data.inputs import InputFilesDataModule

    folder = Path(cfg.paths.output_dir) / FOLDER
    check_plan(folder, plan)
    left = positions_left(folder, len(paths), trainer.world_size)
    if left:
        datamodule = InputFilesDataModule(
            paths,
            module.input_config,
            cfg.batch_size,
            cfg.num_workers,
            cache=bool(cfg.get("cache", False)),
            positions=left,
        )
        trainer.callbacks.append(ShardWriter(folder, int(cfg.shard_size), plan))
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    return merge(folder, len(paths))
