"""A catalogue export as data: a CSV or Parquet table with a path column, label columns and an optional split
column.

One label column is used (`label_column`, e.g. articleType of a catalogue with several). Relative paths
resolve against the table's folder. Rows whose file is missing or unreadable, or whose label is empty, are
skipped with a warning and listed in `skipped` (the train task writes it to the run folder), the way the
image folder source reports unreadable files. A split column holds train/val/test; without one, the rows are
split by `split_fractions`, stratified and seeded. Class indices follow the sorted labels of the training
rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import pandas as pd

from skuvision.data.datamodule import ImageDataModule, stratified_split
from skuvision.data.image_folder import SPLITS, LabelledImageFiles
from skuvision.errors import SkuvisionError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = {".csv": "CSV", ".parquet": "Parquet", ".pq": "Parquet"}


def read_table(path: Path) -> pd.DataFrame:
    """Every column as text, blanks and nulls as ""."""
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise SkuvisionError(f"data.root={path}: a manifest is a .csv or .parquet file")
    if kind == "CSV":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        table = pd.read_parquet(path)
    return table.apply(lambda column: column.astype("string").fillna("").str.strip())


class ManifestDataModule(ImageDataModule):
    """Rows of (path, label[, split]) from a CSV or Parquet manifest at `root`."""

    def __init__(
        self,
        root: str,
        input_config: dict,
        label_column: str = "label",
        path_column: str = "path",
        split_column: str | None = None,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        **kwargs,
    ):
        super().__init__(root=root, input_config=input_config, **kwargs)
        if len(split_fractions) != 3 or min(split_fractions) < 0 or sum(split_fractions) <= 0:
            raise SkuvisionError(
                f"data.split_fractions={list(split_fractions)} must be three non-negative numbers"
            )
        self.label_column = label_column
        self.path_column = path_column
        self.split_column = split_column
        self.split_fractions = [float(f) for f in split_fractions]
        self.skipped: dict[str, str] = {}  # path -> why it was skipped

    @cached_property
    def manifest(self) -> Path:
        path = Path(self.root).expanduser()
        if not path.is_file():
            raise SkuvisionError(
                f"data.root={self.root} is not a file: point it at a .csv or .parquet manifest"
            )
        return path

    @cached_property
    def table(self) -> pd.DataFrame:
        table = read_table(self.manifest)
        keys = {"data.path_column": self.path_column, "data.label_column": self.label_column}
        if self.split_column:
            keys["data.split_column"] = self.split_column
        for key, column in keys.items():
            if column not in table.columns:
                columns = ", ".join(table.columns)
                raise SkuvisionError(
                    f"{key}={column} is not a column of {self.manifest}; its columns: {columns}"
                )
        return table

    def row_name(self, i: int) -> str:
        """How a user finds row i (0-based) of the table: its data row, and its line in a CSV."""
        line = f" (line {i + 2})" if self.manifest.suffix.lower() == ".csv" else ""
        return f"{self.manifest} row {i + 1}{line}"

    @cached_property
    def row_splits(self) -> list[str] | None:
        """train/val/test per row from the split column; None without one."""
        if not self.split_column:
            return None
        given = self.table[self.split_column]
        values = given.str.lower().tolist()
        for i, value in enumerate(values):
            if value not in SPLITS:
                raise SkuvisionError(
                    f"{self.row_name(i)}: {self.split_column}={given.iat[i]!r} is not a split; "
                    f"use one of {', '.join(SPLITS)}"
                )
        return values

    @cached_property
    def class_names(self) -> list[str]:
        labels = self.table[self.label_column]
        if self.row_splits is not None:
            labels = labels[[s == "train" for s in self.row_splits]]
        names = sorted(set(labels) - {""})
        if len(names) < 2:
            raise SkuvisionError(
                f"{self.manifest}: column {self.label_column} needs at least two labels among the training "
                f"rows to train a classifier; found {names or 'none'}"
            )
        return names

    def _rows(self) -> list[tuple[int, Path, str]]:
        """(row, resolved path, label) of the rows with a label and a readable file; the rest are skipped."""
        rows, reasons = [], {}
        for i, (raw_path, label) in enumerate(
            zip(self.table[self.path_column], self.table[self.label_column], strict=True)
        ):
            path = Path(
                os.path.normpath(self.manifest.parent / Path(raw_path).expanduser())
            )  # absolute: kept
            if not raw_path:
                reasons[f"{self.row_name(i)}"] = f"empty {self.path_column}"
            elif not label:
                reasons[str(path)] = f"empty {self.label_column} ({self.row_name(i)})"
            elif not path.is_file():
                reasons[str(path)] = f"file not found ({self.row_name(i)})"
            else:
                rows.append((i, path, label))
        unreadable = self.find_unreadable(self.manifest.parent, sorted({p for _, p, _ in rows}))
        reasons.update({str(p): reason for p, reason in unreadable.items()})
        for where, reason in reasons.items():
            log.warning("skipping %s (%s)", where, reason)
        self.skipped.update(reasons)
        return [row for row in rows if row[1] not in unreadable]

    def load_splits(self) -> dict[str, LabelledImageFiles]:
        self.skipped = {}
        index = {name: i for i, name in enumerate(self.class_names)}
        rows = self._rows()
        if self.row_splits is None:
            labels = [index[label] for _, _, label in rows]
            parts = stratified_split(labels, self.split_fractions, self.seed)
            by_split = {s: [rows[i] for i in idx] for s, idx in zip(SPLITS, parts, strict=True)}
        else:
            by_split = {s: [row for row in rows if self.row_splits[row[0]] == s] for s in SPLITS}
        for split, split_rows in by_split.items():
            for i, _, label in split_rows:
                if label not in index:
                    raise SkuvisionError(
                        f"{self.row_name(i)}: {self.label_column}={label!r} ({split}) is not among the "
                        f"training labels {self.class_names}; add training rows for it or drop the row"
                    )
        found = {label for _, _, label in by_split["train"]}
        empty = [name for name in self.class_names if name not in found]
        if empty:
            raise SkuvisionError(
                f"{self.manifest}: no readable training images for label(s) {empty} "
                f"(see the skipped rows logged above); fix the paths or drop the rows"
            )
        return {
            split: LabelledImageFiles([(path, index[label]) for _, path, label in split_rows])
            for split, split_rows in by_split.items()
        }
