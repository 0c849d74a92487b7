"""Trainer.predict over a whole catalogue in shards: each process writes what it computed as Parquet files in
the run folder's shards/, and a rerun into that folder skips what they hold.

Every image of the input has a position (its row in input order), carried in the sample beside its read
error (data.inputs.InputFilesDataModule with `positions`), never inferred from batch order. Lightning splits
the positions among the processes with its UnrepeatedDistributedSampler (no padded duplicates). A process
writes a shard whenever `shard_size` images have gathered, and the rest at the end: columns `index` (the
position), `path` (the input's item at that position), `error`, and the model's float32 outputs, one
fixed-size list column per output (`out`, or `out/<column>` for a model with several heads). Each shard is
written under a temporary name and then named `<first position>-rank<r>-<sha256 of its bytes>.parquet`
(skuvision.outputs.new_file), so a killed run leaves only complete shards, and the name is the shard's record.

plan.json beside them records what decides the outputs (checkpoint, TTA, precision, the input list, each
output's width); a rerun with another plan is refused instead of mixing results. `merge` reads every shard
back in input order and checks that each position is there exactly once.

A resumed run trusts nothing in its run folder (read_shards): shards/ and every file in it must be plain files
(no symbolic links, opened without following one), each named as above with the SHA-256 of its bytes, of
exactly the plan's columns and types, its rows at increasing positions of the input whose `path` is the
input's item there, no position in two shards. Anything else is refused, naming the file. Parquet holds no
code (pyarrow >= 14.0.1 does not load pickled extension types), and the JSON plan is read as plain data.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
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
PLAN_BYTES = 1 << 20  # a plan is a few hundred bytes; a bigger file is not one this code wrote
SHARD_NAME = re.compile(r"(?P<first>\d{10})-rank(?P<rank>\d+)-(?P<sha256>[0-9a-f]{64})\.parquet")
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


def output_widths(module) -> dict[str, int]:
    """{shard column: width} of the module's predict outputs (logits or features), from one blank image."""
    size = tuple(module.input_config["input_size"])
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module.predict_step((torch.zeros(1, *size), None), 0)["outputs"]
    finally:
        module.train(training)
    return {name: int(values.shape[1]) for name, values in as_columns(out).items()}


def shard_schema(columns: dict[str, int], labels: bool = False) -> pa.Schema:
    """`labels`: a `label` column too (a split of litdata shards, whose labels are only in the samples)."""
    fields = [("index", pa.int64()), ("path", pa.string()), ("error", pa.string())]
    fields += [(name, pa.list_(pa.float32(), width)) for name, width in columns.items()]
    return pa.schema(fields + ([("label", pa.int64())] if labels else []))


def open_no_links(path, flags: int = os.O_RDONLY, dir_fd: int | None = None, shown=None) -> int:
    """A descriptor of `path` itself (relative to `dir_fd`, shown as `shown`): refused where it is a
    symbolic link (O_NOFOLLOW's ELOOP) or cannot be opened."""
    shown = shown or path
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)  # a FIFO must not block
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SkuvisionError(
                f"{shown} is a symbolic link, which a run folder's shards never are: remove it and rerun"
            ) from None
        raise SkuvisionError(f"{shown}: cannot open it ({err.strerror}): move it away and rerun") from None


def read_plain_file(path, limit: int | None = None, dir_fd: int | None = None, shown=None) -> bytes:
    """The bytes of the plain file `path` (see open_no_links), at most `limit` of them."""
    shown = shown or path
    with os.fdopen(open_no_links(path, dir_fd=dir_fd, shown=shown), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SkuvisionError(f"{shown} is not a plain file: move it out of the run folder and rerun")
        data = f.read(limit + 1 if limit else -1)
    if limit and len(data) > limit:
        raise SkuvisionError(f"{shown} is over {limit} bytes, not a plan this code wrote: move it away")
    return data


def shards_folder(folder: Path) -> Path:
    """`folder` (the run folder's shards/), refused where it is a symbolic link or not a folder."""
    folder = Path(folder)
    if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
        raise SkuvisionError(
            f"{folder} is not a folder of this run's own (a symbolic link or a file): remove it and rerun"
        )
    return folder


def links_in_run_folder(folder: Path) -> list[Path]:
    """Symbolic links among what a resumed run reads or writes in its run folder (its entries, .hydra/'s and
    shards/'s): Hydra's config and log writers, and the shard reader, would follow them elsewhere."""
    folder = Path(folder)
    found = []
    for place in (folder, folder / ".hydra", folder / FOLDER):
        if place != folder and place.is_symlink():
            continue  # listed with its parent
        if place.is_dir():
            found += [p for p in sorted(place.iterdir()) if p.is_symlink()]
    return found


def check_plan(folder: Path, plan: dict) -> None:
    """Refuse to add to shards of another plan (another checkpoint, input list, setting or output width)."""
    written = shards_folder(folder) / PLAN
    if not os.path.lexists(written):
        return
    try:
        earlier = json.loads(read_plain_file(written, PLAN_BYTES))
    except (ValueError, UnicodeDecodeError):
        earlier = None
    if not isinstance(earlier, dict):
        raise SkuvisionError(f"{written} is not a plan this code wrote (not a JSON object): move it away")
    changed = sorted(k for k in set(plan) | set(earlier) if plan.get(k) != earlier.get(k))
    if changed:
        raise SkuvisionError(
            f"{folder} holds shards of another run ({', '.join(changed)} differ): rerun the same command to "
            "resume it, or leave hydra.run.dir at its default for a new run"
        )


def shard_files(folder: Path) -> list[Path]:
    """The complete shards in `folder` by name (a partial one of a killed run has a hidden name)."""
    return sorted(p for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))


def read_shards(
    folder: Path, items: list[str], columns: dict[str, int], outputs: bool = True, labels: bool = False
) -> list[pa.Table]:
    """Every shard in `folder`, each checked against the plan (see the module's doc) and refused, naming the
    file, where it is not exactly what this run writes; without `outputs`, only their index and path
    columns are decoded (the SHA-256 still covers every byte)."""
    folder = shards_folder(folder)
    if not folder.exists():
        return []
    schema = shard_schema(columns, labels)
    owner = np.full(len(items), -1, dtype=np.int64)
    tables: list[pa.Table] = []
    fd = open_no_links(folder, os.O_RDONLY | os.O_DIRECTORY)  # listed and read through it
    try:
        for name in sorted(os.listdir(fd)):
            if name.startswith(".") or name == PLAN:  # a killed write's partial file, never read
                continue
            path = folder / name
            match = SHARD_NAME.fullmatch(name)
            if match is None:
                raise SkuvisionError(
                    f"{path} is not a shard this code writes (<position>-rank<r>-<sha256>.parquet): move it "
                    "out of the run folder and rerun"
                )
            data = read_plain_file(name, dir_fd=fd, shown=path)
            if hashlib.sha256(data).hexdigest() != match["sha256"]:
                raise SkuvisionError(
                    f"{path}: its bytes do not match the SHA-256 in its name (truncated, corrupted or "
                    "changed): move it out of shards/ and rerun to predict its images again"
                )
            first = int(match["first"])
            tables.append(checked_shard(path, data, schema, items, first, owner, len(tables), outputs))
    finally:
        os.close(fd)
    return tables


def checked_shard(
    path, data: bytes, schema, items, first: int, owner: np.ndarray, number: int, outputs: bool
) -> pa.Table:
    def refuse(why: str):
        return SkuvisionError(f"{path}: {why}; not a shard of this run: move it out of shards/ and rerun")

    try:
        file = pq.ParquetFile(pa.BufferReader(data))
        found = file.schema_arrow.remove_metadata()
        if not found.equals(schema):
            raise refuse(f"columns {found.names} of types {[str(t) for t in found.types]}")
        # A resume needs the positions and paths only; the outputs are decoded once, at the merge.
        table = file.read(columns=None if outputs else ["index", "path"])
    except (pa.ArrowException, OSError) as err:
        raise refuse(f"not a readable Parquet file ({str(err).splitlines()[0]})") from None
    if table.num_rows == 0 or any(table.column(c).null_count for c in ("index", "path")):
        raise refuse("no rows, or rows without a position or path")
    if outputs and "label" in schema.names and table.column("label").null_count:
        raise refuse("rows without a label")
    lists = [f.name for f in schema if pa.types.is_fixed_size_list(f.type)]
    for name in lists if outputs else []:
        if table.column(name).combine_chunks().flatten().null_count:
            raise refuse(f"missing values in {name}")
    index = table.column("index").to_numpy()
    if index[0] != first or (index < 0).any() or (index >= len(items)).any() or (np.diff(index) <= 0).any():
        raise refuse(f"its positions are not increasing ones of the {len(items)} inputs from {first}")
    paths = table.column("path").to_pylist()
    wrong = next((i for i, p in zip(index.tolist(), paths, strict=True) if items[i] != p), None)
    if wrong is not None:
        raise refuse(f"position {wrong} is {items[wrong]!r} in this run's input, not the shard's path")
    again = owner[index] >= 0
    if again.any():
        raise refuse(f"position {int(index[again][0])} is also in another shard")
    owner[index] = number
    return table


def positions_left(tables: list[pa.Table], total: int, processes: int, folder: Path) -> list[int]:
    """The input positions no shard holds yet, in order; refused where some processes would get none
    (Lightning's sampler needs at least one image per process)."""
    done = np.zeros(total, dtype=bool)
    for table in tables:
        done[table.column("index").to_numpy()] = True
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


def write_shard(
    folder: Path,
    rank: int,
    index: np.ndarray,
    paths: list[str],
    errors: list[str],
    outputs: dict,
    labels: np.ndarray | None = None,
) -> Path:
    columns = {
        "index": pa.array(index, type=pa.int64()),
        "path": pa.array(paths, type=pa.string()),
        "error": pa.array(errors, type=pa.string()),
    }
    for name, values in outputs.items():
        flat = pa.array(values.reshape(-1), type=pa.float32())
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    data = sink.getvalue().to_pybytes()
    name = f"{int(index[0]):010d}-rank{rank}-{hashlib.sha256(data).hexdigest()}.parquet"
    with new_file(shards_folder(folder) / name) as partial:
        partial.write_bytes(data)
    return Path(folder) / name


class ShardWriter(Callback):
    """Writes each process's predict outputs in shards of `shard_size` images (see the module's doc), and
    waits at the end until every process has written its last one. Rank zero logs images/s."""

    def __init__(self, folder: Path, shard_size: int, plan: dict, items: list[str]):
        if shard_size < 1:
            raise SkuvisionError(f"shard_size={shard_size}: give a number of images of at least 1")
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.plan = plan
        self.items = items
        self.stop_after = int(os.environ.get(STOP_AFTER, "0"))

    def on_predict_start(self, trainer, pl_module) -> None:
        self.buffer: list[tuple] = []
        self.buffered = self.images = self.written = 0
        self.started = time.perf_counter()
        shards_folder(self.folder).mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero and not os.path.lexists(self.folder / PLAN):
            write_new_json(self.folder / PLAN, self.plan)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        meta = outputs["meta"]
        index = meta["index"].cpu().numpy()
        labels = meta["label"].cpu().numpy() if "label" in meta else None
        self.buffer.append((index, list(meta["error"]), as_columns(outputs["outputs"]), labels))
        self.buffered += len(index)
        if self.buffered >= self.shard_size:
            self.flush(trainer)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.flush(trainer)
        trainer.strategy.barrier("skuvision_shards")

    def flush(self, trainer) -> None:
        if not self.buffer:
            return
        # In position order: a stream's order need not be its stored one.
        index = np.concatenate([b[0] for b in self.buffer])
        order = np.argsort(index, kind="stable")
        index = index[order]
        errors = [e for b in self.buffer for e in b[1]]
        errors = [errors[i] for i in order.tolist()]
        outputs = {k: np.concatenate([b[2][k] for b in self.buffer])[order] for k in self.buffer[0][2]}
        labels = np.concatenate([b[3] for b in self.buffer])[order] if self.buffer[0][3] is not None else None
        paths = [self.items[i] for i in index.tolist()]
        path = write_shard(self.folder, trainer.global_rank, index, paths, errors, outputs, labels)
        self.images += len(index)
        self.buffer, self.buffered, self.written = [], 0, self.written + 1
        if trainer.is_global_zero:
            rate = self.images / max(time.perf_counter() - self.started, 1e-9)
            line = (
                f"{path.name[:16]}: {len(index)} image(s); rank 0 at {rate:.1f} images/s, about "
                f"{rate * trainer.world_size:.1f} images/s on {trainer.world_size} process(es)"
            )
            log.info(line)
            if not log.hasHandlers():  # a process ddp_spawn started: Hydra's logging is not set up there
                print(line, file=sys.stderr, flush=True)
        if self.stop_after and self.written >= self.stop_after:
            raise RuntimeError(f"stopped after {self.written} shard(s) ({STOP_AFTER})")


def merge(folder: Path, items: list[str], columns: dict[str, int], labels: bool = False) -> tuple:
    """Every shard in input order: (the outputs as one float32 tensor, or {column: tensor} for several
    heads; each image's read error[; with `labels`, each image's label]), checked (read_shards) to hold each
    of `items` exactly once."""
    tables = read_shards(folder, items, columns, labels=labels)
    done = np.zeros(len(items), dtype=bool)
    for table in tables:
        done[table.column("index").to_numpy()] = True
    if not done.all():
        missing = np.flatnonzero(~done)[:5].tolist()
        raise SkuvisionError(
            f"{folder}: the shards do not hold each of the {len(items)} images (missing: {missing}, ...): "
            "rerun the same command to predict them"
        )
    table = pa.concat_tables(tables)
    order = np.argsort(table.column("index").to_numpy(), kind="stable")
    table = table.take(pa.array(order))
    errors = table.column("error").to_pylist()
    outputs = {}
    for name in columns:
        lists = table.column(name).combine_chunks()
        values = lists.flatten().to_numpy(zero_copy_only=False).reshape(len(lists), -1)
        outputs[name] = torch.from_numpy(values.copy())
    merged = (
        outputs["out"]
        if list(outputs) == ["out"]
        else {k.removeprefix("out/"): v for k, v in outputs.items()}
    )
    if labels:
        return merged, errors, table.column("label").to_pylist()
    return merged, errors


def sharded(cfg, trainer) -> bool:
    """`shards`: null writes shards when several processes run (or SLURM requeues one), true always."""
    choice = cfg.get("shards")
    if choice is not None and not choice and trainer.world_size > 1:
        # One pass would leave each process with its share alone, and rank zero would write only its own.
        raise SkuvisionError(
            f"shards=false on {trainer.world_size} processes: several processes gather their results only "
            "through shards; leave shards at null, or run one process (trainer=cpu)"
        )
    return trainer.world_size > 1 if choice is None else bool(choice)


def predict_in_shards(cfg, trainer, module, paths: list[Path], plan: dict):
    """Trainer.predict over the input files no shard of this run folder holds yet, written in shards; then,
    on rank zero, every shard merged in input order: (outputs, errors). None on the other ranks."""
    from skuvision.data.inputs import InputFilesDataModule

    folder = Path(cfg.paths.output_dir) / FOLDER
    items = [str(p) for p in paths]
    columns = output_widths(module)
    plan = {**plan, "columns": columns}
    check_plan(folder, plan)
    done = read_shards(folder, items, columns, outputs=False)
    left = positions_left(done, len(items), trainer.world_size, folder)
    if left:
        datamodule = InputFilesDataModule(
            paths,
            module.input_config,
            cfg.batch_size,
            cfg.num_workers,
            cache=bool(cfg.get("cache", False)),
            positions=left,
        )
        trainer.callbacks.append(ShardWriter(folder, int(cfg.shard_size), plan, items))
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    return merge(folder, items, columns)


def predict_split_in_shards(cfg, trainer, module, source, split: str, items: list[str], plan: dict):
    """predict_in_shards over `split` of `source`, a data module of litdata shards (StreamingDataModule:
    litdata splits the chunks among the processes, data.stream_positions) or of a split held in memory
    (Lightning's sampler splits the positions left, data.split_positions); `items` names its images. A
    resumed run skips, before decoding, the images its finished shards hold. On rank zero: (outputs, errors,
    labels) in the split's order; None on the other ranks."""
    from skuvision.data.split_positions import SplitPositionsDataModule
    from skuvision.data.stream_positions import StreamPositionsDataModule
    from skuvision.data.streaming import StreamingDataModule

    folder = Path(cfg.paths.output_dir) / FOLDER
    columns = output_widths(module)
    plan = {**plan, "columns": columns, "labels": True}
    check_plan(folder, plan)
    tables = read_shards(folder, items, columns, outputs=False, labels=True)
    left = positions_left(tables, len(items), trainer.world_size, folder)
    if len(items) < trainer.world_size:
        raise SkuvisionError(
            f"split={split}: {len(items)} image(s) for {trainer.world_size} processes: embed it with fewer "
            "processes, or with trainer=cpu"
        )
    if left:
        if isinstance(source, StreamingDataModule):
            done = np.ones(len(items), dtype=bool)
            done[left] = False
            datamodule = StreamPositionsDataModule(source, split, cfg.batch_size, cfg.num_workers, done)
        else:
            datamodule = SplitPositionsDataModule(source, split, left, cfg.batch_size)
        trainer.callbacks.append(ShardWriter(folder, int(cfg.shard_size), plan, items))
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    return merge(folder, items, columns, labels=True)
