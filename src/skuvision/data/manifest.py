"""A catalogue export as data: a CSV or Parquet table with a path column, label columns and an optional split
column.

One label column (`label_column`, e.g. articleType), or several (`label_columns`, one softmax head each) and
tag columns (`tag_columns`, one sigmoid head each, tags separated by `tag_separator`). With several, a row
with an empty value in one label column still trains the other heads (its target there is -1, masked out of
that head's loss); an empty tag cell means "no tags". A label column that is a coarser level of another
(skuvision.data.taxonomy) is read off the finer head instead of getting one of its own, unless
`taxonomy=false`. Relative paths
resolve against the table's folder. Rows whose file is missing or unreadable, or whose label is empty, are
skipped with a warning and listed in `skipped` (the train task writes it to the run folder), the way the
image folder source reports unreadable files. A split column holds train/val/test; without one, the rows are
split by `split_fractions`, stratified and seeded. Class indices follow the sorted labels of the training
rows.

Exports repeat themselves. Rows naming the same file (compared as files: relative or absolute, `./`, `..`,
symbolic and hard links alike) are used once, in the first such row's split, so no image is both trained and
tested on; the later rows are listed in `skipped`. The same file under two labels stops the run, naming both
rows. Surrounding spaces are removed from every cell ("Red " is Red, with a warning when a label had them);
labels that differ only in case ("Two", "two") stop the run, naming the spellings and their counts: which
spelling is right, or whether they are one class at all, is the catalogue owner's call, and a guess would name
a class in the checkpoint and in every prediction.

A CSV is read as exports write it (a BOM, CRLF line ends, quoted values spanning lines), and each row keeps
the line it starts on, which every message names. A line with more or fewer fields than the header, or a quote
that never closes, is left out and listed in `skipped` by its line; more than 5% of the data lines (and more
than one) stops the run, since then the export's quoting is broken, not a row. `path_pattern`
(`images/{id}.jpg`) builds each row's path from its columns, in place of a path column. A path column's
paths are the manifest owner's (absolute and `..` allowed); a pattern's cells are data, so a row whose cells
lead out of the folder the pattern's fixed start names stops the run, naming its line.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from skuvision.data.datamodule import SPLITS, ImageDataModule, checked_split_fractions, stratified_split
from skuvision.data.datasets import LabelledImageFiles, TableImageFiles
from skuvision.data.taxonomy import find_taxonomy
from skuvision.errors import SkuvisionError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = {".csv": "CSV", ".parquet": "Parquet", ".pq": "Parquet"}


EXAMPLES = 3  # rows quoted in a warning or an error; the rest are counted


# Of a CSV's data lines: more malformed ones (and more than one) is a broken export, not a few typos.
MALFORMED_SHARE = 0.05


@dataclass(frozen=True)
class ReadTable:
    """A manifest as read: its rows (every cell text, as written), the line each row starts on in a CSV (None
    for Parquet), and the CSV records left out, by the line each starts on: why."""

    rows: pd.DataFrame
    lines: list[int] | None = None
    malformed: dict[int, str] = field(default_factory=dict)


def as_text(table: pd.DataFrame) -> pd.DataFrame:
    return table.reset_index(drop=True).apply(lambda column: column.astype("string").fillna(""))


def read_table(path: Path) -> ReadTable:
    """Every column as text, blanks and nulls as "", as written (spaces included); in a CSV, each row's line
    and the records left out."""
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise SkuvisionError(f"data.root={path}: a manifest is a .csv or .parquet file")
    if kind == "CSV":
        return read_csv(path)
    return ReadTable(as_text(pd.read_parquet(path)))


def read_csv(path: Path) -> ReadTable:
    """A CSV export (a BOM and CRLF line ends allowed) with each row's line; records whose fields do not match
    the header, or whose quotes do not close, are left out, unless there are too many to be a few typos.

    One csv.reader(strict=True) pass, the reader pandas' python engine uses: its on_bad_lines callable gets a
    bad line's fields but not its line, and a short line reaches no callable at all (pandas pads it)."""
    records = csv_records(text_lines(path))
    first = next(records, None)
    if first is None:
        raise SkuvisionError(f"{path} is empty: a manifest's first line names its columns (path,label,...)")
    start, _, header, why = first
    if header is None:
        raise SkuvisionError(f"{path} line {start}: the header is not readable CSV ({why}); fix its quoting")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        names = ", ".join(map(repr, repeated))
        raise SkuvisionError(
            f"{path}: the header names {names} more than once; give each column its own name"
        )
    rows, lines, malformed = [], [], {}
    data_lines = bad_lines = 0
    for start, end, fields, why in records:
        data_lines += end - start + 1
        if fields is not None and len(fields) == len(header):
            rows.append(fields)
            lines.append(start)
            continue
        malformed[start] = why or f"{len(fields)} fields where the header has {len(header)}"
        bad_lines += end - start + 1
    if bad_lines > 1 and bad_lines > MALFORMED_SHARE * data_lines:
        shown = ", ".join(f"line {n} ({why})" for n, why in list(malformed.items())[:EXAMPLES])
        more = ", ..." if len(malformed) > EXAMPLES else ""
        raise SkuvisionError(
            f"{path}: {bad_lines} of {data_lines} data lines are malformed (more than {MALFORMED_SHARE:.0%}):"
            f' {shown}{more}; quote every value that holds a comma, a quote or a line break ("Red, large"), '
            f"close every quote, and export again"
        )
    return ReadTable(pd.DataFrame(rows, columns=header, dtype="string"), lines, malformed)


def text_lines(path: Path) -> list[str]:
    """The file's lines, line ends kept as written (a quoted value may hold one); a leading BOM dropped."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SkuvisionError(
            f"{path} line {line} is not UTF-8 text ({e.reason}); export the table as UTF-8 (Excel: CSV UTF-8)"
        ) from None
    return io.StringIO(text, newline="").readlines()  # splits at \n, \r\n and \r only, as csv does


def csv_records(lines: list[str]) -> Iterator[tuple[int, int, list[str] | None, str]]:
    """(first line, last line, fields or None, why not readable) of each record that is not a blank line."""
    reader = csv.reader(lines, strict=True)
    while True:
        start = reader.line_num + 1
        try:
            fields, why = next(reader), ""
        except StopIteration:
            return
        except csv.Error as e:
            fields, why = None, unclosed_quote(lines, start) if "unexpected end of data" in str(e) else str(e)
        if fields is None or "".join(fields).strip() or len(fields) > 1:
            yield start, reader.line_num, fields, why


def unclosed_quote(lines: list[str], start: int) -> str:
    """Why the record starting on line `start` runs to the end of the file: the line its open quote is on."""
    fields = next(csv.reader(lines[start - 1 :]))  # not strict: the open quote's value runs to the end
    opened = start + sum(len(re.findall(r"\r\n?|\n", value)) for value in fields[:-1])
    rest = f": lines {opened}-{len(lines)} were read as one value" if len(lines) > opened else ""
    return f"the quote opened on line {opened} never closes{rest}"


def pattern_columns(pattern: str) -> list[str]:
    """The columns data.path_pattern names, each once ({id}, {id[0]} and {id.x} name id)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None]
        columns = list(dict.fromkeys(re.match(r"[^.\[]*", name).group() for name in fields))
        if not columns or not all(columns) or any(c.isdigit() for c in columns):
            raise ValueError("name a column in each pair of braces")
        pattern.format_map(dict.fromkeys(columns, ""))  # a format spec for numbers fails here, not per row
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise SkuvisionError(
            f"data.path_pattern={pattern} is not a path pattern ({e}); name columns in braces, cells are "
            f"text: images/{{id}}.jpg"
        ) from None
    return columns


def pattern_folder(pattern: str) -> str:
    """The folder a path pattern's fixed start names (`images/` of `images/{id}.jpg`; the table's own
    folder for `{id}.jpg`): every row's path must lie in it, whatever its cells hold."""
    start = pattern.split("{", 1)[0]
    return (start.rsplit("/", 1)[0] or "/") if "/" in start else "."


def file_identity(path: Path) -> tuple | Path:
    """What makes two paths one file: device and inode (links and spellings alike), else the resolved path
    where the file system has no inode numbers."""
    st = path.stat()
    return (st.st_dev, st.st_ino) if st.st_ino else path.resolve()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class ManifestDataModule(ImageDataModule):
    """Rows of (path, label[, split]) from a CSV or Parquet manifest at `root`."""

    def __init__(
        self,
        root: str,
        input_config: dict,
        label_column: str = "label",
        path_column: str = "path",
        path_pattern: str | None = None,
        split_column: str | None = None,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        label_columns: Sequence[str] | None = None,
        tag_columns: Sequence[str] | None = None,
        tag_separator: str = ";",
        taxonomy: bool = True,
        **kwargs,
    ):
        super().__init__(root=root, input_config=input_config, **kwargs)
        self.multi = bool(label_columns or tag_columns)
        self.label_columns = list(label_columns or [label_column])
        self.tag_columns = list(tag_columns or [])
        self.label_column = self.label_columns[0]  # what splits are stratified by and samplers balance
        if self.multi and getattr(self.augment, "needs_even_batch", False):
            raise SkuvisionError(
                "augment=mixup_cutmix mixes one label column's targets; with data.label_columns/tag_columns "
                "use another augment option"
            )
        if not tag_separator:
            raise SkuvisionError("data.tag_separator is empty: give the character between tags, e.g. ';'")
        self.tag_separator = tag_separator
        self.taxonomy = bool(taxonomy)
        self.missing_values: dict[str, dict[str, int]] = {}  # label column -> split -> rows without a value
        self.path_column = path_column
        self.path_pattern = path_pattern
        self.split_column = split_column
        self.split_fractions = checked_split_fractions(split_fractions)

    @cached_property
    def manifest(self) -> Path:
        path = Path(self.root).expanduser()
        if not path.is_file():
            raise SkuvisionError(
                f"data.root={self.root} is not a file: point it at a .csv or .parquet manifest"
            )
        return path

    @cached_property
    def export(self) -> ReadTable:
        """The manifest as read: `table` is its rows, cleaned."""
        return read_table(self.manifest)

    @cached_property
    def table(self) -> pd.DataFrame:
        table = self.export.rows
        key = "data.label_columns" if self.multi else "data.label_column"
        # The pattern replaces the path column, which then need not exist.
        keys = [] if self.path_pattern else [("data.path_column", self.path_column)]
        keys += [(key, c) for c in self.label_columns] + [("data.tag_columns", c) for c in self.tag_columns]
        if self.split_column:
            keys.append(("data.split_column", self.split_column))
        for key, column in keys:
            if column not in table.columns:
                columns = ", ".join(table.columns)
                raise SkuvisionError(
                    f"{key}={column} is not a column of {self.manifest}; its columns: {columns}"
                )
        self._check_path_pattern(table.columns)
        named = self.label_columns + self.tag_columns
        if len(set(named)) != len(named):
            raise SkuvisionError(f"data.label_columns/tag_columns name a column twice: {named}")
        given = table[self.label_columns]
        table = table.apply(lambda column: column.str.strip())
        for column in self.label_columns:
            self._report_spaced_labels(given[column], table[column], column)
            self._refuse_case_variants(table[column], column)
        return table

    def _check_path_pattern(self, columns: pd.Index) -> None:
        if not self.path_pattern:
            return
        lacking = [c for c in pattern_columns(self.path_pattern) if c not in columns]
        if lacking:
            raise SkuvisionError(
                f"data.path_pattern={self.path_pattern} names {lacking[0]}, which is not a column of "
                f"{self.manifest}; its columns: {', '.join(columns)}"
            )

    @cached_property
    def raw_paths(self) -> list[str]:
        """Each row's image path as written: its path column, or data.path_pattern filled from its columns (""
        where one of them is empty)."""
        if not self.path_pattern:
            return self.table[self.path_column].tolist()
        cells = self.table[pattern_columns(self.path_pattern)].to_dict("records")
        paths = [self.path_pattern.format_map(row) if all(row.values()) else "" for row in cells]
        base = os.path.join(self._resolved(pattern_folder(self.path_pattern)), "")  # with its "/"
        for i, (path, row) in enumerate(zip(paths, cells, strict=True)):
            if path and ("\0" in path or not self._resolved(path).startswith(base)):
                raise SkuvisionError(
                    f"{self.row_name(i)}: its cells {row} make data.path_pattern={self.path_pattern} name "
                    f"{path!r}, outside {base}: a cell may not leave the pattern's folder (.., /, ~); "
                    "correct the cell or remove the row"
                )
        return paths

    def _resolved(self, path: str) -> str:
        """`path` as _rows opens it: against the table's folder, `~` expanded, `..` applied."""
        return os.path.normpath(self.manifest.parent / Path(path).expanduser())

    def _no_path(self, i: int) -> str:
        """Why row i has no path: its empty path column, or the empty columns its pattern names."""
        if not self.path_pattern:
            return f"empty {self.path_column}"
        empty = [c for c in pattern_columns(self.path_pattern) if not self.table.at[i, c]]
        return f"empty {', '.join(empty)} (data.path_pattern={self.path_pattern})"

    def malformed_lines(self) -> dict[str, str]:
        """{"<manifest> line n": why} of the CSV records left out."""
        return {f"{self.manifest} line {n}": why for n, why in self.export.malformed.items()}

    def _report_spaced_labels(self, given: pd.Series, stripped: pd.Series, column: str) -> None:
        changed = given[(given != stripped) & (stripped != "")]
        if changed.empty:
            return
        counts = changed.value_counts()
        shown = ", ".join(
            f"{value!r} -> {value.strip()!r} ({plural(count, 'row')})"
            for value, count in counts.head(EXAMPLES).items()
        )
        more = f" and {len(counts) - EXAMPLES} more" if len(counts) > EXAMPLES else ""
        log.warning(
            "%s: %s of %s had surrounding spaces, removed: %s%s",
            self.manifest,
            plural(len(changed), "value"),
            column,
            shown,
            more,
        )

    def _refuse_case_variants(self, labels: pd.Series, column: str) -> None:
        """Labels equal but for case would be separate classes (one of them often a single mistyped row)."""
        labelled = labels[labels != ""]
        clashes = [group for _, group in labelled.groupby(labelled.str.casefold()) if group.nunique() > 1]
        if not clashes:
            return

        def counted(group: pd.Series, value: str) -> str:
            rows = group.index[group == value]
            where = ", ".join(self.row_place(i) for i in rows[:EXAMPLES])
            return f"{value!r} ({plural(len(rows), 'row')}: {where}{', ...' if len(rows) > EXAMPLES else ''})"

        first = " and ".join(counted(clashes[0], value) for value in clashes[0].value_counts().index)
        more = f"; {plural(len(clashes) - 1, 'more label')} with case variants" if len(clashes) > 1 else ""
        raise SkuvisionError(
            f"{self.manifest}: {column} values {first} differ only in case and would be separate "
            f"classes{more}; write each label with one spelling in the manifest"
        )

    def row_place(self, i: int) -> str:
        """Row i (0-based) as a user finds it: its data row, and in a CSV the line it starts on."""
        lines = self.export.lines
        return f"row {i + 1}" if lines is None else f"row {i + 1} (line {lines[i]})"

    def row_name(self, i: int) -> str:
        return f"{self.manifest} {self.row_place(i)}"

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
    def training_rows(self) -> pd.DataFrame:
        """The rows classes are read from: those of the train split, or all rows without a split column."""
        if self.row_splits is None:
            return self.table
        return self.table[[s == "train" for s in self.row_splits]]

    @cached_property
    def class_names(self) -> list[str]:
        return self.column_classes(self.label_column)

    def column_classes(self, column: str) -> list[str]:
        names = sorted(set(self.training_rows[column]) - {""})
        if len(names) < 2:
            raise SkuvisionError(
                f"{self.manifest}: column {column} needs at least two labels among the training "
                f"rows to train a classifier; found {names or 'none'}"
            )
        return names

    def tags_of(self, cell: str) -> list[str]:
        return [tag for tag in (t.strip() for t in cell.split(self.tag_separator)) if tag]

    def tag_names(self, column: str) -> list[str]:
        names = sorted({tag for cell in self.training_rows[column] for tag in self.tags_of(cell)})
        if not names:
            raise SkuvisionError(
                f"{self.manifest}: tag column {column} has no tags among the training rows (separator "
                f"{self.tag_separator!r}, data.tag_separator); fill it or drop it from data.tag_columns"
            )
        return names

    @cached_property
    def hierarchy(self) -> dict[str, tuple[str, dict[str, str]]]:
        """{coarse column: (trained column it is read off, {fine class: coarse class})}; logged once."""
        if not (self.multi and self.taxonomy):
            return {}
        found = find_taxonomy(self.training_rows, self.label_columns)
        found = {coarse: self._rooted(coarse, found) for coarse in found}
        kept = {}
        for coarse, (fine, mapping) in found.items():
            if set(mapping) == set(self.column_classes(fine)) and set(mapping.values()) == set(
                self.column_classes(coarse)
            ):
                kept[coarse] = (fine, mapping)
                log.info(
                    "taxonomy: %s is read off %s (each of its %d classes has one %s)",
                    coarse,
                    fine,
                    len(mapping),
                    coarse,
                )
        return kept

    @staticmethod
    def _rooted(coarse: str, found: dict) -> tuple[str, dict[str, str]]:
        """A coarse column's mapping from a trained column: through its source's source where that one is a
        coarser level itself."""
        fine, mapping = found[coarse]
        while fine in found:
            finer, finer_mapping = found[fine]
            mapping = {f: mapping[m] for f, m in finer_mapping.items() if m in mapping}
            fine = finer
        return fine, mapping

    @cached_property
    def heads(self) -> list[dict] | None:
        """One head spec per label and tag column (skuvision.models.heads); None for one label column."""
        if not self.multi:
            return None
        specs = []
        for column in self.label_columns:
            spec = {"column": column, "kind": "label", "classes": self.column_classes(column)}
            if column in self.hierarchy:
                fine, mapping = self.hierarchy[column]
                index = {name: i for i, name in enumerate(spec["classes"])}
                spec |= {"source": fine, "parents": [index[mapping[f]] for f in self.column_classes(fine)]}
            specs.append(spec)
        specs += [{"column": c, "kind": "tags", "classes": self.tag_names(c)} for c in self.tag_columns]
        return specs

    @cached_property
    def row_labels(self) -> list:
        """Each row's label, or with several columns the tuple of its label and tag cells."""
        if not self.multi:
            return self.table[self.label_column].tolist()
        return list(self.table[self.label_columns + self.tag_columns].itertuples(index=False, name=None))

    def _rows(self) -> list[tuple[int, Path, str]]:
        """(row, resolved path, label) of the rows with a label and a readable file, one row per file; the
        rest are skipped."""
        rows, reasons = [], self.malformed_lines()
        first_row: dict = {}  # file identity -> its first row in `rows`
        repeats: list[tuple[int, tuple]] = []  # (row, the earlier row naming the same file)
        conflicts: list[tuple[int, str, tuple]] = []  # (row, its label, the earlier row with another label)
        for i, (raw_path, label) in enumerate(zip(self.raw_paths, self.row_labels, strict=True)):
            path = Path(
                os.path.normpath(self.manifest.parent / Path(raw_path).expanduser())
            )  # absolute: kept
            if not raw_path:
                reasons[f"{self.row_name(i)}"] = self._no_path(i)
            elif not any(label) if self.multi else not label:
                empty = ", ".join(self.label_columns + self.tag_columns) if self.multi else self.label_column
                reasons[str(path)] = f"empty {empty} ({self.row_name(i)})"
            elif not path.is_file():
                reasons[str(path)] = f"file not found ({self.row_name(i)})"
            else:
                earlier = first_row.setdefault(file_identity(path), (i, path, label))
                if earlier[0] == i:
                    rows.append(earlier)
                elif earlier[2] != label:
                    conflicts.append((i, label, earlier))
                else:
                    repeats.append((i, earlier))
        if conflicts:
            self._refuse_two_labels(conflicts)
        reasons.update(self._report_repeats(repeats))
        unreadable = self.find_unreadable(self.manifest.parent, sorted({p for _, p, _ in rows}))
        reasons.update({str(p): reason for p, reason in unreadable.items()})
        for where, reason in reasons.items():
            log.warning("skipping %s (%s)", where, reason)
        self.skipped.update(reasons)
        return [row for row in rows if row[1] not in unreadable]

    def split_of(self, i: int) -> str | None:
        return self.row_splits[i] if self.row_splits is not None else None

    def _refuse_two_labels(self, conflicts: list[tuple[int, str, tuple]]) -> None:
        i, label, (j, path, earlier_label) = conflicts[0]
        more = f" ({plural(len(conflicts) - 1, 'more row')} like it)" if len(conflicts) > 1 else ""
        raise SkuvisionError(
            f"{self.manifest}: {self.row_place(j)} ({self.labels_named(earlier_label)}) and "
            f"{self.row_place(i)} ({self.labels_named(label)}) name the same file {path}{more}; a file "
            f"has one label: correct or drop one of the rows"
        )

    def labels_named(self, label) -> str:
        if not self.multi:
            return f"{self.label_column}={label!r}"
        return ", ".join(
            f"{c}={v!r}" for c, v in zip(self.label_columns + self.tag_columns, label, strict=True)
        )

    def _report_repeats(self, repeats: list[tuple[int, tuple]]) -> dict[str, str]:
        """Warn once about rows naming a file an earlier row names; {row: why} for `skipped`."""
        if not repeats:
            return {}
        reasons, examples = {}, []
        across = 0
        for i, (j, path, _) in repeats:
            kept, given = self.split_of(j), self.split_of(i)
            moved = kept != given
            across += moved
            where = f" (this row says {given}; kept in {kept})" if moved else ""
            reasons[self.row_name(i)] = f"the same file as {self.row_place(j)}: {path}, used once{where}"
            if len(examples) < EXAMPLES:
                examples.append(f"{self.row_place(i)} = {self.row_place(j)} ({path}{where})")
        in_splits = f", {across} of them for another split" if across else ""
        log.warning(
            "%s: %s a file an earlier row names%s; each file is used once, in its first row's split: "
            "%s%s (all listed with the skipped rows)",
            self.manifest,
            plural(len(repeats), "row") + (" names" if len(repeats) == 1 else " name"),
            in_splits,
            "; ".join(examples),
            ", ..." if len(repeats) > EXAMPLES else "",
        )
        return reasons

    def load_splits(self) -> dict[str, LabelledImageFiles]:
        self.skipped = {}
        index = {name: i for i, name in enumerate(self.class_names)}
        rows = self._rows()
        first_label = [label[0] if self.multi else label for _, _, label in rows]
        if self.row_splits is None:
            parts = stratified_split(
                [index.get(label, -1) for label in first_label], self.split_fractions, self.seed
            )
            by_split = {s: [rows[i] for i in idx] for s, idx in zip(SPLITS, parts, strict=True)}
        else:
            by_split = {s: [row for row in rows if self.row_splits[row[0]] == s] for s in SPLITS}
        for column in self.label_columns:
            self._check_known_labels(by_split, column)
        found = {self.table[self.label_column].iat[i] for i, _, _ in by_split["train"]}
        empty = [name for name in self.class_names if name not in found]
        if empty:
            raise SkuvisionError(
                f"{self.manifest}: no readable training images for label(s) {empty} "
                f"(see the skipped rows logged above); fix the paths or drop the rows"
            )
        if not self.multi:
            return {
                split: LabelledImageFiles([(path, index[label]) for _, path, label in split_rows])
                for split, split_rows in by_split.items()
            }
        self._count_missing(by_split)
        return {
            split: TableImageFiles(
                [(path, index.get(self.table[self.label_column].iat[i], -1)) for i, path, _ in split_rows],
                [self.row_targets(i) for i, _, _ in split_rows],
            )
            for split, split_rows in by_split.items()
        }

    def _check_known_labels(self, by_split: dict, column: str) -> None:
        known = set(self.column_classes(column))
        for split, split_rows in by_split.items():
            for i, _, _ in split_rows:
                label = self.table[column].iat[i]
                if label and label not in known:
                    raise SkuvisionError(
                        f"{self.row_name(i)}: {column}={label!r} ({split}) is not among the "
                        f"training labels {sorted(known)}; add training rows for it or drop the row"
                    )

    @cached_property
    def target_index(self) -> dict[str, dict[str, int]]:
        return {h["column"]: {name: k for k, name in enumerate(h["classes"])} for h in self.heads}

    def row_targets(self, i: int) -> dict:
        """{column: class index or -1} for label columns, {column: multi-hot float32} for tag columns; tags
        unseen in training are left out (no head can predict them)."""
        targets: dict = {}
        for column in self.label_columns:
            targets[column] = self.target_index[column].get(self.table[column].iat[i], -1)
        for column in self.tag_columns:
            index = self.target_index[column]
            vector = torch.zeros(len(index))
            for tag in self.tags_of(self.table[column].iat[i]):
                if tag in index:
                    vector[index[tag]] = 1.0
            targets[column] = vector
        return targets

    def _count_missing(self, by_split: dict) -> None:
        """Rows without a value per label column and split (they train the other heads): logged, reported."""
        self.missing_values = {
            column: {
                s: sum(self.table[column].iat[i] == "" for i, _, _ in rows) for s, rows in by_split.items()
            }
            for column in self.label_columns
        }
        for column, counts in self.missing_values.items():
            if any(counts.values()):
                log.warning(
                    "%s: rows without %s (they train the other heads): %s", self.manifest, column, counts
                )

    def data_report(self) -> dict:
        report = super().data_report()
        if self.multi:
            report["columns"] = {
                "heads": [
                    {k: v for k, v in h.items() if k != "parents"} | {"classes": len(h["classes"])}
                    for h in self.heads
                ],
                "missing_values": self.missing_values,
                "taxonomy": {
                    coarse: {"source": fine, "parents": mapping}
                    for coarse, (fine, mapping) in self.hierarchy.items()
                },
            }
        return report

    def loss_class_weights(self):
        """With balance="loss" and several columns: {column: N / (K * count_k)} per trained label head."""
        if not self.multi or self.balance != "loss":
            return super().loss_class_weights()
        self.setup()
        weights = {}
        for head in self.heads:
            if head["kind"] != "label" or "source" in head:
                continue
            labels = np.asarray([t[head["column"]] for t in self.splits_targets("train")])
            counts = np.bincount(labels[labels >= 0], minlength=len(head["classes"])).astype(float)
            if (counts == 0).any():
                raise SkuvisionError(
                    f"data.balance=loss: no training images for some class of {head['column']}"
                )
            weights[head["column"]] = (counts.sum() / (len(counts) * counts)).tolist()
        return weights

    def splits_targets(self, split: str) -> list[dict]:
        dataset = self.splits[split]
        base = dataset.dataset if hasattr(dataset, "indices") else dataset
        indices = dataset.indices if hasattr(dataset, "indices") else range(len(base))
        return [base.row_targets[i] for i in indices]
