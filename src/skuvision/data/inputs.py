"""Input of predict and embed: images named by path (a folder, a file, a list file, a manifest, or a list of
paths), and the data module that batches them for Trainer.predict.

A manifest (a .csv or .parquet table whose header names a `path` column, as data=manifest reads) gives one
image per row, in the table's order, relative paths against the table's folder as data=manifest resolves them;
a row naming a file an earlier row names is predicted again, so that every row has its answer.

An unreadable file does not stop the run: it yields a blank image and its error (datasets.InputImageFiles),
which the caller reports in its own row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from skuvision.data.datasets import InputImageFiles, broken_link
from skuvision.data.decode import IMAGE_SUFFIXES
from skuvision.data.decode_cache import DecodedImageCache
from skuvision.data.transforms import ToModelInput
from skuvision.errors import SkuvisionError

LIST_SUFFIXES = {".txt", ".csv", ".lst"}
MANIFEST_SUFFIXES = {".csv", ".parquet", ".pq"}
PATH_COLUMN = "path"


def manifest_rows(path: Path) -> list[Path] | None:
    """Each row's image of the manifest `path` (see the module's doc); None where it has no `path` column
    (a plain list file)."""
    from skuvision.data.manifest import read_table

    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
        if PATH_COLUMN not in [cell.strip().strip('"') for cell in first.split(",")]:
            return None
    table = read_table(path)
    if PATH_COLUMN not in table.rows.columns:
        raise SkuvisionError(
            f"input={path}: a table of images needs a {PATH_COLUMN} column; its columns: "
            f"{', '.join(table.rows.columns)}"
        )
    if table.malformed:
        line, why = next(iter(table.malformed.items()))
        raise SkuvisionError(
            f"input={path} line {line} is not a row ({why}): fix its quoting, so that every row is predicted"
        )
    return [
        Path(os.path.normpath(path.parent / Path(cell.strip()).expanduser()))
        for cell in table.rows[PATH_COLUMN]
    ]


def collect_inputs(inputs: str | Sequence[str]) -> list[Path]:
    """Image paths from a folder (recursively), an image file, a text file with one path per line, a manifest
    (one per row, see the module's doc), or a list of any of these; in a stable order. A broken symbolic
    link in a folder is kept, for its error row."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            paths += sorted(
                p
                for p in path.rglob("*")
                if (p.is_file() or broken_link(p))
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not p.name.startswith(".")
            )
        elif (
            path.suffix.lower() in MANIFEST_SUFFIXES
            and path.is_file()
            and (rows := manifest_rows(path)) is not None
        ):
            paths += rows
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            lines = [line.strip().split(",")[0] for line in path.read_text().splitlines() if line.strip()]
            paths += [Path(line).expanduser() for line in lines]
        else:
            paths.append(path)  # a missing or unreadable file becomes an error row, not a crash
    if not paths:
        raise SkuvisionError(f"input={inputs}: no image files found; give a folder, an image, or a list file")
    return paths


class Positioned(Dataset):
    """The files at `positions` (of the input, in order): each sample carries its position beside its read
    error, {"error": ..., "index": position}, so outputs are matched to files without relying on the order
    batches come in (skuvision.shards)."""

    def __init__(self, files: InputImageFiles, positions: Sequence[int]):
        self.files = files
        self.positions = list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        image, error = self.files[self.positions[i]]
        return image, {"error": error, "index": self.positions[i]}


class InputFilesDataModule(LightningDataModule):
    """Batches of files for Trainer.predict, normalized on the device like the training data.

    `cache`: read and fill the decoded-image cache (see skuvision.data.decode_cache). `positions`: read only
    these files (positions in `paths`), each sample carrying its position (Positioned)."""

    def __init__(
        self,
        paths: list[Path],
        input_config: dict,
        batch_size: int = 64,
        num_workers: int = 2,
        cache: bool = False,
        positions: Sequence[int] | None = None,
    ):
        super().__init__()
        self.dataset = InputImageFiles(paths, input_config)
        self.positions = positions
        self.to_model_input = ToModelInput(input_config)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = cache

    def setup(self, stage: str | None = None) -> None:
        if self.cache and self.dataset.cached is None:
            store = DecodedImageCache(self.dataset.input_config, self.dataset.channels)
            self.dataset.cached = store.fill(
                self.dataset, self.own_positions(), workers=max(2, self.num_workers)
            )

    def own_positions(self) -> list[int] | None:
        """The positions this process will read: with several processes, every world_size-th of `positions`
        from its rank, as Lightning's UnrepeatedDistributedSampler deals them (a position outside it is only
        decoded without the cache)."""
        if self.positions is None:
            return None
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return list(self.positions)[rank::world]

    def predict_dataloader(self) -> DataLoader:
        dataset = self.dataset if self.positions is None else Positioned(self.dataset, self.positions)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, errors = batch
        return self.to_model_input(images), errors
